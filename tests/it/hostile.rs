//! Malformed and hostile requests get a clear refusal (or a closed connection where HTTP
//! allows nothing else); nothing is forwarded and nothing else is disturbed.

use std::time::Duration;

use crate::support;
use crate::support::{bearer, raw_exchange, Gateway, Upstream};

async fn answer(gateway: &Gateway, request: String) -> String {
    tokio::time::timeout(
        Duration::from_secs(10),
        raw_exchange(gateway.addr, &request),
    )
    .await
    .expect("the gateway hung on a hostile request")
}

fn status_of(answer: &str) -> Option<u16> {
    answer.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn hostile_requests_are_refused_and_never_forwarded() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let key = bearer();
    let cases: Vec<(&str, String, &[u16])> = vec![
        ("garbage request line", "NONSENSE\r\n\r\n".to_owned(), &[400]),
        ("bad HTTP version", "GET /v1/models HTTP/9.9\r\nHost: gw\r\nConnection: close\r\n\r\n".to_owned(), &[400, 505]),
        (
            "header name with a space",
            format!("GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nBad Header: x\r\nAuthorization: {key}\r\n\r\n"),
            &[400],
        ),
        (
            // A bare LF ends a line (RFC 9112 §2.2 lets servers accept that); a bare CR inside
            // a value is an attempt to smuggle a header past someone's parser.
            "bare CR inside a header value",
            format!("GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-A: b\rX-Injected: c\r\nAuthorization: {key}\r\n\r\n"),
            &[400],
        ),
        (
            "control byte in a header value",
            format!("GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-A: b\x01c\r\nAuthorization: {key}\r\n\r\n"),
            &[400],
        ),
        (
            "CONNECT tunnel request",
            format!("CONNECT 169.254.169.254:443 HTTP/1.1\r\nHost: 169.254.169.254:443\r\nConnection: close\r\nAuthorization: {key}\r\n\r\n"),
            &[400, 404, 405],
        ),
        (
            "conflicting Content-Length",
            format!("POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nAuthorization: {key}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
            &[400],
        ),
        (
            "chunked body over the limit",
            format!("POST /v1/tiny HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nAuthorization: {key}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n"),
            &[413],
        ),
    ];
    for (name, request, allowed) in cases {
        let answer = answer(&gateway, request).await;
        match status_of(&answer) {
            Some(status) => assert!(allowed.contains(&status), "{name}: got {answer:?}"),
            // Closing without an answer is what HTTP allows for some malformed requests.
            None => assert!(answer.is_empty(), "{name}: got {answer:?}"),
        }
    }
    assert!(
        upstream.requests().is_empty(),
        "a hostile request was forwarded: {:?}",
        upstream.requests()
    );
    let key = bearer();
    // Both framings at once (the start of request smuggling): hyper lets chunked win and drops
    // Content-Length (RFC 9112 §6.3), so the upstream gets one consistent framing.
    let answer = answer(
        &gateway,
        format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nAuthorization: {key}\r\n\
             Content-Type: application/json\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
             7\r\n{{\"a\":1}}\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status_of(&answer), Some(200), "{answer}");
    let requests = upstream.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].body_text(), "{\"a\":1}");
    assert!(requests[0]
        .header("content-length")
        .is_none_or(|len| len == "7"));

    // And the gateway still serves everyone else.
    let response = support::get_with_key(gateway.url("/v1/models")).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn over_http2_the_same_refusals_hold() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let h2 = support::h2_client();
    let cases = [
        (
            h2.get(gateway.url("/v1/files/a%2Fb"))
                .header("authorization", bearer()),
            400,
        ),
        (h2.get(gateway.url("/v1/models")), 401),
        (
            h2.post(gateway.url("/v1/embeddings"))
                .header("authorization", bearer())
                .header("content-type", "text/plain")
                .body("x"),
            415,
        ),
        (
            h2.post(gateway.url("/v1/tiny"))
                .header("authorization", bearer())
                .body("0123456789abcdef"),
            413,
        ),
        (
            h2.delete(gateway.url("/v1/embeddings"))
                .header("authorization", bearer()),
            405,
        ),
    ];
    for (request, expected) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status().as_u16(), expected);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["error"]["message"].is_string());
    }
    assert!(upstream.requests().is_empty());
}
