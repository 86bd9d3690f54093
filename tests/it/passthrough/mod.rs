//! What the client sends is what the upstream gets, and back: bodies, paths, queries, headers.

mod requests;

use crate::support;
use crate::support::{bearer, client, json_response, sha256, Gateway, Upstream, KEY};
use poem::Response;
use serde_json::{json, Value};

#[tokio::test]
async fn json_body_reaches_upstream_byte_for_byte_with_query() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    // Key order, whitespace and unicode escapes must survive: nothing re-serialises JSON.
    let body = br#"{ "model":"gpt-4o",  "messages":[{"role":"user","content":"h\u00e9llo"}] }"#;
    let response = client()
        .post(gateway.url("/v1/chat/completions?trace=a%20b&x=1&x=2"))
        .header("authorization", bearer())
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let rec = upstream.last();
    assert_eq!(rec.method, "POST");
    assert_eq!(
        rec.path_and_query,
        "/v1/chat/completions?trace=a%20b&x=1&x=2"
    );
    assert_eq!(rec.body_sha256, sha256(body));
    assert_eq!(
        rec.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(rec.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn every_body_kind_passes_unchanged() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let multipart =
        b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\
Content-Type: application/octet-stream\r\n\r\n\x00\x01\xff{\"prompt\":1}\n\r\n--XyZ--\r\n"
            .to_vec();
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let sdp = b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n".to_vec();
    let cases: Vec<(reqwest::Method, &str, &str, Vec<u8>)> = vec![
        (
            reqwest::Method::POST,
            "/v1/files",
            "multipart/form-data; boundary=XyZ",
            multipart,
        ),
        (
            reqwest::Method::PUT,
            "/v1/blobs/blob-1",
            "application/octet-stream",
            binary,
        ),
        (
            reqwest::Method::POST,
            "/v1/realtime/calls",
            "application/sdp",
            sdp,
        ),
        (
            reqwest::Method::POST,
            "/v1/embeddings",
            "application/json",
            br#"{"input":"x","model":"text-embedding-3-small"}"#.to_vec(),
        ),
    ];
    for (method, path, content_type, body) in cases {
        let response = client()
            .request(method.clone(), gateway.url(path))
            .header("authorization", bearer())
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{method} {path}");
        let rec = upstream.last();
        assert_eq!(rec.method, method.as_str());
        assert_eq!(rec.path_and_query, path);
        assert_eq!(rec.body_len, body.len() as u64, "{path}");
        assert_eq!(rec.body_sha256, sha256(&body), "{path}");
        assert_eq!(rec.header("content-type"), Some(content_type));
    }

    // Kind "none": a GET and a DELETE arrive with no body.
    for (method, path) in [
        (reqwest::Method::GET, "/v1/models"),
        (reqwest::Method::DELETE, "/v1/files/file-abc"),
    ] {
        let response = client()
            .request(method.clone(), gateway.url(path))
            .header("authorization", bearer())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let rec = upstream.last();
        assert_eq!((rec.method.as_str(), rec.body_len), (method.as_str(), 0));
    }
}

#[tokio::test]
async fn response_body_status_and_headers_come_back_unchanged() {
    // Arbitrary bytes with a gzip Content-Encoding: nothing may be decompressed or altered.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let expected = payload.clone();
    let upstream = Upstream::start(move |_| {
        Response::builder()
            .status(http::StatusCode::CREATED)
            .header("content-type", "application/octet-stream")
            .header("content-encoding", "gzip")
            .header("x-request-id", "req_123")
            .header("x-ratelimit-remaining-requests", "59")
            .header("openai-processing-ms", "42")
            .header("openai-version", "2020-10-01")
            .header("keep-alive", "timeout=5")
            .body(payload.clone())
    })
    .await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let response = client()
        .get(gateway.url("/v1/files/file-1/content"))
        .header("authorization", bearer())
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let headers = response.headers().clone();
    for (name, value) in [
        ("content-encoding", "gzip"),
        ("x-request-id", "req_123"),
        ("x-ratelimit-remaining-requests", "59"),
        ("openai-processing-ms", "42"),
        ("openai-version", "2020-10-01"),
        ("content-type", "application/octet-stream"),
        ("content-length", "100000"),
    ] {
        assert_eq!(headers.get(name).unwrap(), value, "{name}");
    }
    assert!(
        headers.get("keep-alive").is_none(),
        "hop-by-hop header came back"
    );
    assert_eq!(
        response.bytes().await.unwrap().as_ref(),
        expected.as_slice()
    );
    assert_eq!(upstream.last().header("accept-encoding"), Some("gzip"));
}

#[tokio::test]
async fn end_to_end_headers_pass_and_hop_by_hop_and_client_address_do_not() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let response = client()
        .get(gateway.url("/v1/models"))
        .header("authorization", bearer())
        .header("openai-organization", "org-1")
        .header("openai-project", "proj-1")
        .header("openai-beta", "assistants=v2")
        .header("idempotency-key", "idem-1")
        .header("x-stainless-lang", "python")
        .header("x-stainless-retry-count", "0")
        .header("api-key", "azure-style")
        .header("accept", "application/json")
        .header("user-agent", "OpenAI/Python 1.99.0")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret-hop")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic cHJveHk6cGFzcw==")
        .header("x-forwarded-for", "203.0.113.7")
        .header("forwarded", "for=203.0.113.7")
        .header("x-real-ip", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let rec = upstream.last();
    for (name, value) in [
        ("authorization", bearer()),
        ("openai-organization", "org-1".into()),
        ("openai-project", "proj-1".into()),
        ("openai-beta", "assistants=v2".into()),
        ("idempotency-key", "idem-1".into()),
        ("x-stainless-lang", "python".into()),
        ("x-stainless-retry-count", "0".into()),
        ("api-key", "azure-style".into()),
        ("accept", "application/json".into()),
        ("user-agent", "OpenAI/Python 1.99.0".into()),
        ("host", upstream.addr.to_string()),
    ] {
        assert_eq!(rec.header(name), Some(value.as_str()), "{name}");
    }
    for name in [
        "x-hop",
        "te",
        "proxy-authorization",
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
    ] {
        assert!(rec.header(name).is_none(), "{name} reached the upstream");
    }
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let upstream = Upstream::start(|rec| {
        let status = if rec.path_and_query.contains("models") { 429 } else { 500 };
        let mut response = json_response(
            status,
            &json!({"error": {"message": "Rate limit reached", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}),
        );
        response
            .headers_mut()
            .insert("retry-after", http::HeaderValue::from_static("7"));
        response
    })
    .await;
    let gateway = Gateway::in_front_of(&upstream).await;
    for (path, status) in [("/v1/models", 429), ("/v1/files/f", 500)] {
        let response = support::get_with_key(gateway.url(path)).await;
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["retry-after"], "7");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    }
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "gateway errors are JSON"
    );
    let body: Value = response.json().await.unwrap();
    for field in ["message", "type", "param", "code"] {
        assert!(
            body["error"].get(field).is_some(),
            "error.{field} missing: {body}"
        );
    }
    (status, body)
}

#[tokio::test]
async fn missing_key_is_401_without_upstream_call() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let response = client()
        .post(gateway.url("/v1/embeddings"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(response).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("didn't provide an API key"));
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn unknown_route_is_404_and_wrong_method_is_405_with_allow() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let response = support::get_with_key(gateway.url("/v1/nonexistent?key=should-not-echo")).await;
    let (status, body) = error_of(response).await;
    assert_eq!(status, 404);
    assert_eq!(
        body["error"]["message"],
        "Invalid URL (GET /v1/nonexistent): this gateway serves no such route"
    );

    let response = client()
        .delete(gateway.url("/v1/embeddings"))
        .header("authorization", bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["allow"], "POST");
    let (status, body) = error_of(response).await;
    assert_eq!(status, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed");

    let response = client()
        .put(gateway.url("/v1/files/file-1"))
        .header("authorization", bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["allow"], "DELETE, GET");
    assert!(upstream.requests().is_empty());
}

async fn assert_413_naming(response: reqwest::Response, setting: &str) {
    let (status, body) = error_of(response).await;
    assert_eq!(status, 413);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(setting), "{message}");
}

#[tokio::test]
async fn body_over_limit_is_413_naming_the_setting() {
    let upstream = Upstream::echo().await;
    let manifest = support::test_manifest(
        &upstream.base_url(),
        "[limits]\nmax_json_body = \"1KiB\"\nmax_upload_body = \"4KiB\"",
    );
    let gateway = Gateway::start(&manifest).await;

    // Declared by Content-Length: refused before anything is forwarded.
    let response = client()
        .post(gateway.url("/v1/embeddings"))
        .header("authorization", bearer())
        .header("content-type", "application/json")
        .body(vec![b' '; 2048])
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(response).await;
    assert_eq!(status, 413);
    assert_eq!(
        body["error"]["message"],
        "Request body of 2048 bytes is over the limit of 1KiB (limits.max_json_body) for this route"
    );

    // Chunked with no length: cut while streaming.
    let response = client()
        .post(gateway.url("/v1/files"))
        .header("authorization", bearer())
        .header("content-type", "multipart/form-data; boundary=x")
        .body(reqwest::Body::wrap_stream(support::pattern_stream(
            64 * 1024,
            1024,
        )))
        .send()
        .await
        .unwrap();
    assert_413_naming(response, "4KiB (limits.max_upload_body)").await;

    // A route's own max_body wins and is named.
    let response = client()
        .post(gateway.url("/v1/tiny"))
        .header("authorization", bearer())
        .body("01234567890")
        .send()
        .await
        .unwrap();
    assert_413_naming(response, "(routes[10].max_body)").await;

    // Within the limit, the same routes forward.
    let response = client()
        .post(gateway.url("/v1/embeddings"))
        .header("authorization", bearer())
        .header("content-type", "application/json")
        .body(vec![b' '; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn encoded_traversal_in_params_is_400_and_never_forwarded() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    for path in [
        "/v1/files/..%2F..%2Fadmin",
        "/v1/files/%2e%2e",
        "/v1/files/..",
        "/v1/files/a%5Cb/content",
        "/v1/files/a%0d%0aX-Injected:%201",
        "/v1/files/%2E%2E/content",
        // Found by tests/properties.rs: not UTF-8 once decoded.
        "/v1/files/abc%e5",
    ] {
        // Raw bytes: an HTTP client library would normalise these paths before sending.
        let answer = support::raw_get(gateway.addr, path).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["param"], "file_id", "{path}");
        assert_eq!(body["error"]["code"], "invalid_path_parameter", "{path}");
    }
    assert!(upstream.requests().is_empty());

    // Percent-encoded but harmless values pass through raw, not decoded.
    let response = support::get_with_key(gateway.url("/v1/files/ft%3Agpt-4o%3Aorg")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.last().path_and_query,
        "/v1/files/ft%3Agpt-4o%3Aorg"
    );
}

#[tokio::test]
async fn absolute_form_request_goes_only_to_the_configured_upstream() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let answer = support::raw_get(gateway.addr, "http://169.254.169.254/v1/models?x=1").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let rec = upstream.last();
    assert_eq!(rec.path_and_query, "/v1/models?x=1");
    assert_eq!(rec.header("host"), Some(upstream.addr.to_string().as_str()));
}

#[tokio::test]
async fn a_base_url_path_prefixes_the_clients_path_and_query() {
    let upstream = Upstream::echo().await;
    let manifest = support::test_manifest(&format!("{}/proxy/openai/", upstream.base_url()), "");
    let gateway = Gateway::start(&manifest).await;
    let response = support::get_with_key(gateway.url("/v1/files/file-1?limit=2&after=a%2Fb")).await;
    assert_eq!(response.status(), 200);
    let rec = upstream.last();
    assert_eq!(
        rec.path_and_query,
        "/proxy/openai/v1/files/file-1?limit=2&after=a%2Fb"
    );
    assert_eq!(rec.header("host"), Some(upstream.addr.to_string().as_str()));
}

#[tokio::test]
async fn health_answers_like_the_original() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    for path in ["/", "/health"] {
        let response = client().get(gateway.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.text().await.unwrap(),
            "OpenAI API Server is running"
        );
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn cors_preflight_echoes_requested_method_and_headers() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let response = client()
        .request(
            reqwest::Method::OPTIONS,
            gateway.url("/v1/chat/completions"),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, x-stainless-os",
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert_eq!(headers["access-control-allow-methods"], "POST");
    assert_eq!(
        headers["access-control-allow-headers"],
        "authorization, content-type, x-stainless-os"
    );
    assert!(upstream.requests().is_empty());

    let response = client()
        .get(gateway.url("/v1/models"))
        .header("origin", "https://app.example")
        .header("authorization", bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    assert_eq!(response.headers()["access-control-expose-headers"], "*");
}

#[tokio::test]
async fn cors_with_listed_origins_answers_only_those() {
    let upstream = Upstream::echo().await;
    let manifest = support::test_manifest(
        &upstream.base_url(),
        "[cors]\nallow_origins = [\"https://ok.example\"]",
    );
    let gateway = Gateway::start(&manifest).await;
    let ask = |origin: &'static str| {
        client()
            .get(gateway.url("/v1/models"))
            .header("origin", origin)
            .header("authorization", bearer())
            .send()
    };
    let allowed = ask("https://ok.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://ok.example"
    );
    assert_eq!(allowed.headers()["vary"], "Origin");
    let other = ask("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn api_key_header_counts_as_credential_and_errors_never_echo_it() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let response = client()
        .get(gateway.url("/v1/models"))
        .header("api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Gateway-made errors with a key attached still never carry it.
    for path in ["/v1/files/..", "/v1/nope"] {
        let response = support::get_with_key(gateway.url(path)).await;
        let text = response.text().await.unwrap();
        assert!(!text.contains(KEY), "{text}");
    }
}

#[tokio::test]
async fn http2_clients_are_served_and_their_bodies_forwarded() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let h2 = support::h2_client();
    // A streamed body: over HTTP/2 it has neither Content-Length nor Transfer-Encoding.
    let body = support::pattern_stream(100_000, 8192);
    let response = h2
        .post(gateway.url("/v1/files"))
        .header("authorization", bearer())
        .header("content-type", "multipart/form-data; boundary=x")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let rec = upstream.last();
    assert_eq!(rec.body_len, 100_000);
    assert_eq!(rec.body_sha256, support::pattern_sha256(100_000, 8192));

    let response = h2
        .get(gateway.url("/v1/models"))
        .header("authorization", bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().body_len, 0);
}
