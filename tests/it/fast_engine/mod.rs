//! The fast lane (`server.fast_lane`): its wire behaviour matches hyper's path byte for byte
//! where it matters, it hands everything else to hyper on the same connection, and it copes
//! with upstreams that close pooled connections, delimit bodies by closing, or die mid-body.

mod alike;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support;
use crate::support::{bearer, read_answer, read_message, Gateway, RawUpstream, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LANE_REQUESTS: &str = "oa_bypass_fast_lane_requests_total";
const HANDOVERS: &str = "oa_bypass_fast_lane_handovers_total";

fn without_lane(manifest: &str) -> String {
    format!("[server]\nfast_lane = false\n{manifest}")
}

/// The value of a counter in the gateway's metrics.
async fn counter(gateway: &Gateway, name: &str) -> u64 {
    let text = support::scrape(gateway.url("/metrics")).await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// What the upstream answers in the comparison: JSON with hop-by-hop headers to strip,
/// SSE in chunks, an empty 204, and an error status.
fn comparison_upstream() -> impl Fn(&support::Recorded) -> poem::Response + Send + Sync {
    |rec| {
        let path = rec.path_and_query.as_str();
        if path.starts_with("/v1/chat/completions") && rec.body_text().contains("stream") {
            let events = futures_util::stream::iter(["data: {\"a\":1}\n\n", "data: [DONE]\n\n"])
                .map(|event| Ok::<_, std::io::Error>(bytes::Bytes::from(event)));
            poem::Response::builder()
                .header("content-type", "text/event-stream")
                .header("x-request-id", "req_sse")
                .body(poem::Body::from_bytes_stream(events))
        } else if path.starts_with("/v1/chat/completions") {
            poem::Response::builder()
                .header("content-type", "application/json")
                .header("x-request-id", "req_1")
                .header("openai-processing-ms", "12")
                .header("connection", "x-hop")
                .header("x-hop", "must go")
                .header("keep-alive", "timeout=5")
                .body(r#"{"id":"chatcmpl-1","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#)
        } else if path.starts_with("/v1/embeddings") {
            poem::Response::builder()
                .status(http::StatusCode::NO_CONTENT)
                .body(poem::Body::empty())
        } else {
            support::json_response(
                404,
                &serde_json::json!({"error": {"message": "nope", "type": "invalid_request_error", "param": null, "code": null}}),
            )
        }
    }
}

use futures_util::StreamExt;

/// Requests written raw on one keep-alive connection, as clients send them.
fn comparison_requests() -> Vec<String> {
    let key = bearer();
    let post = |path: &str, body: &str, extra: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: {key}\r\n\
             X-Forwarded-For: 203.0.113.9\r\nOpenAI-Beta: assistants=v2\r\nX-Stainless-Lang: python\r\n\
             {extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let json = "Content-Type: application/json\r\n";
    vec![
        post(
            "/v1/chat/completions?api-version=1",
            r#"{"model":"gpt-4o-mini"}"#,
            json,
        ),
        post(
            "/v1/chat/completions",
            r#"{"stream":true}"#,
            &format!("{json}Accept: text/event-stream\r\n"),
        ),
        post(
            "/v1/embeddings",
            "{}",
            &format!("{json}Connection: keep-alive\r\n"),
        ),
        format!(
            "GET /v1/models HTTP/1.1\r\nHost: gw\r\napi-key: {}\r\n\r\n",
            support::KEY
        ),
        // Refused by the gateway itself, the same way on both paths.
        "GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n".to_owned(),
        post("/v1/tiny", "01234567890123", json),
        post("/v1/embeddings", "x", "Content-Type: text/plain\r\n"),
    ]
}

#[tokio::test]
async fn the_lane_and_hyper_send_and_answer_the_same() {
    let mut seen = Vec::new();
    let upstream = Upstream::start(comparison_upstream()).await;
    for lane in [true, false] {
        let already = upstream.requests().len();
        let manifest = support::test_manifest(&upstream.base_url(), "");
        let gateway = Gateway::start(&if lane {
            manifest
        } else {
            without_lane(&manifest)
        })
        .await;
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        let mut pending = Vec::new();
        let mut answers = Vec::new();
        for request in comparison_requests() {
            stream.write_all(request.as_bytes()).await.unwrap();
            answers.push(read_answer(&mut stream, &mut pending).await);
        }
        let received: Vec<_> = upstream
            .requests()
            .into_iter()
            .skip(already)
            .map(|rec| {
                let mut headers: Vec<_> = rec
                    .headers
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
                    .collect();
                headers.sort();
                (rec.method, rec.path_and_query, headers, rec.body_sha256)
            })
            .collect();
        let lane_requests = counter(&gateway, LANE_REQUESTS).await;
        seen.push((answers, received, lane_requests));
    }
    let (lane, hyper) = (&seen[0], &seen[1]);
    // The lane took the requests it should (all of them but none), hyper none.
    assert_eq!(lane.2, 7);
    assert_eq!(hyper.2, 0);
    for (index, (ours, theirs)) in lane.0.iter().zip(&hyper.0).enumerate() {
        assert_eq!(
            ours, theirs,
            "answer {index} differs between the lane and hyper"
        );
    }
    assert_eq!(lane.1, hyper.1, "the upstream received different requests");
    // And the comparison compared something: hop-by-hop and address headers went both ways.
    let first = &lane.0[0];
    assert_eq!(first.status, 200);
    assert!(first
        .headers
        .iter()
        .all(|(name, _)| name != "x-hop" && name != "keep-alive"));
    assert!(first
        .headers
        .contains(&("x-request-id".into(), "req_1".into())));
    assert_eq!(lane.0[1].body, b"data: {\"a\":1}\n\ndata: [DONE]\n\n");
    assert_eq!(lane.0[2].status, 204);
    assert_eq!(lane.0[4].status, 401);
    assert_eq!(lane.0[5].status, 413);
    assert_eq!(lane.0[6].status, 415);
    let sent = &lane.1[0].2;
    assert!(sent.iter().all(|(name, _)| name != "x-forwarded-for"));
    assert!(sent.contains(&("openai-beta".into(), "assistants=v2".into())));
    assert_eq!(
        lane.1.len(),
        4,
        "refused requests never reached the upstream"
    );
}

#[tokio::test]
async fn requests_the_lane_does_not_take_go_to_hyper_on_the_same_connection() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let mut pending = Vec::new();
    let key = bearer();
    // Taken by the lane.
    let plain = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    // A chunked body: for hyper.
    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: {key}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
    );
    // Every scrape of /metrics is itself a handover (not a lane route): count from here.
    let before = counter(&gateway, HANDOVERS).await;
    for request in [&plain, &chunked, &plain] {
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream, &mut pending).await;
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    assert_eq!(counter(&gateway, LANE_REQUESTS).await, 1);
    // The chunked request's, and the scrape's just before.
    assert_eq!(counter(&gateway, HANDOVERS).await - before, 1 + 2);
    let bodies: Vec<_> = upstream.requests().iter().map(|r| r.body_text()).collect();
    assert_eq!(bodies, ["{}", "{}", "{}"]);

    // Routes with parameters, and heads hyper must judge, go the same way.
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(
            format!("GET /v1/files/file-1 HTTP/1.1\r\nHost: gw\r\nAuthorization: {key}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(read_answer(&mut stream, &mut Vec::new()).await.status, 200);
    let malformed = support::raw_exchange(
        gateway.addr,
        "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    )
    .await;
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    // Those two, three scrapes, and the chunked request's.
    assert_eq!(counter(&gateway, HANDOVERS).await - before, 2 + 3 + 1);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let upstream = Upstream::start(|rec| {
        support::json_response(200, &serde_json::json!({ "query": rec.path_and_query }))
    })
    .await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let key = bearer();
    let all: String = (0..5)
        .map(|i| {
            format!(
                "POST /v1/embeddings?n={i} HTTP/1.1\r\nHost: gw\r\nAuthorization: {key}\r\n\
                 Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
            )
        })
        .collect();
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(all.as_bytes()).await.unwrap();
    let mut pending = Vec::new();
    for i in 0..5 {
        let answer = read_answer(&mut stream, &mut pending).await;
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(body["query"], format!("/v1/embeddings?n={i}"));
    }
    assert_eq!(counter(&gateway, LANE_REQUESTS).await, 5);
}

/// An upstream on raw sockets: each connection is answered by `answer` (given the request
/// number), which writes what it likes and says whether to keep the connection open.
async fn raw_upstream(
    answer: impl Fn(usize, &mut TcpStream) -> futures_util::future::BoxFuture<'_, bool>
        + Send
        + Sync
        + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let answer = Arc::new(answer);
    let requests = Arc::new(AtomicUsize::new(0));
    let upstream = RawUpstream::start(move |mut stream| {
        let (answer, requests) = (Arc::clone(&answer), Arc::clone(&requests));
        async move {
            let mut pending = Vec::new();
            while read_message(&mut stream, &mut pending).await.is_some() {
                let number = requests.fetch_add(1, Ordering::SeqCst);
                if !answer(number, &mut stream).await {
                    return;
                }
            }
        }
    })
    .await;
    (upstream.addr, upstream.connections)
}

fn post_chat(gateway: &Gateway) -> reqwest::RequestBuilder {
    support::client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", bearer())
        .header("content-type", "application/json")
        .body("{}")
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used() {
    // Every answer says keep-alive, then the upstream closes the connection anyway a moment
    // later, as servers do when their idle timeout is shorter than ours.
    let closed = Arc::new(AtomicUsize::new(0));
    let closing = Arc::clone(&closed);
    let (addr, connections) = raw_upstream(move |_, stream| {
        let closing = Arc::clone(&closing);
        Box::pin(async move {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
                )
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = stream.shutdown().await;
            closing.fetch_add(1, Ordering::SeqCst);
            false
        })
    })
    .await;
    let gateway = Gateway::start(&support::test_manifest(&format!("http://{addr}"), "")).await;
    for round in 1..=3 {
        let response = post_chat(&gateway).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
        // Closed before the next request, as between a user's requests (on loopback the
        // close is then at the gateway's socket).
        let closes = || closed.load(Ordering::SeqCst) >= round;
        support::until("the upstream's close", support::LOG_DEADLINE, closes).await;
    }
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_answer_that_says_close_is_not_pooled_and_one_that_does_not_is() {
    let (addr, connections) = raw_upstream(|number, stream| {
        Box::pin(async move {
            let close = number % 2 == 0;
            let head = if close { "Connection: close\r\n" } else { "" };
            let _ = stream
                .write_all(
                    format!("HTTP/1.1 200 OK\r\n{head}Content-Length: 2\r\n\r\nok").as_bytes(),
                )
                .await;
            !close
        })
    })
    .await;
    let gateway = Gateway::start(&support::test_manifest(&format!("http://{addr}"), "")).await;
    for _ in 0..4 {
        let response = post_chat(&gateway).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    // Requests 0 and 2 said close; 1 kept its connection, which 2 reused; 3 needed a new one.
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn bodies_delimited_by_close_or_chunked_with_trailers_arrive_whole() {
    let (addr, _) = raw_upstream(|number, stream| {
        Box::pin(async move {
            let answer: &[u8] = if number == 0 {
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"until\":\"close\"}"
            } else {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n\
                  3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nx-t: 1\r\n\r\n"
            };
            let _ = stream.write_all(answer).await;
            number != 0
        })
    })
    .await;
    let gateway = Gateway::start(&support::test_manifest(&format!("http://{addr}"), "")).await;
    let response = post_chat(&gateway).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "{\"until\":\"close\"}");
    let response = post_chat(&gateway).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "abcdefg");
}

#[tokio::test]
async fn an_upstream_that_dies_mid_body_leaves_the_client_an_incomplete_answer() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let (addr, _) = raw_upstream(move |_, stream| {
            Box::pin(async move {
                let _ = stream.write_all(answer).await;
                false
            })
        })
        .await;
        let gateway = Gateway::start(&support::test_manifest(&format!("http://{addr}"), "")).await;
        let response = post_chat(&gateway).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.bytes().await.is_err(),
            "{:?}: the cut answer looked complete",
            String::from_utf8_lossy(answer)
        );
    }
}

#[tokio::test]
async fn an_upstream_that_answers_garbage_is_a_502() {
    let (addr, _) = raw_upstream(|_, stream| {
        Box::pin(async move {
            let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
            false
        })
    })
    .await;
    let gateway = Gateway::start(&support::test_manifest(&format!("http://{addr}"), "")).await;
    let response = post_chat(&gateway).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "gateway_error", "{body}");
}

#[tokio::test]
async fn large_answers_and_bodies_near_the_lanes_limit_pass_whole() {
    const ANSWER: u64 = 5 << 20;
    let upstream = Upstream::start(|rec| {
        let body = poem::Body::from_bytes_stream(support::pattern_stream(ANSWER, 16 * 1024));
        let response = poem::Response::builder().header("content-type", "application/octet-stream");
        if rec.path_and_query.contains("length") {
            response
                .header("content-length", ANSWER.to_string())
                .body(body)
        } else {
            response.body(body)
        }
    })
    .await;
    let gateway = Gateway::in_front_of(&upstream).await;
    for query in ["?length", "?chunked"] {
        let response = support::client()
            .post(gateway.url(&format!("/v1/chat/completions{query}")))
            .header("authorization", bearer())
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body = response.bytes().await.unwrap();
        assert_eq!(body.len() as u64, ANSWER, "{query}");
        assert_eq!(
            support::sha256(&body),
            support::pattern_sha256(ANSWER, 16 * 1024),
            "{query}"
        );
    }

    // A body just under the lane's limit, sent in pieces with pauses.
    let body: Vec<u8> = (0..60 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let key = bearer();
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nAuthorization: {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for piece in body.chunks(7 * 1024) {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = read_answer(&mut stream, &mut Vec::new()).await;
    assert_eq!(answer.status, 200);
    let received = upstream.last();
    assert_eq!(received.body_sha256, support::sha256(&body));
    assert_eq!(counter(&gateway, LANE_REQUESTS).await, 3);
}
