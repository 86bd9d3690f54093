//! The JSON request line's fields, and upstream failures counted by kind.

use super::*;

#[tokio::test]
async fn json_logs_carry_one_line_per_request_with_its_fields() {
    let upstream = openai_like_upstream().await;
    let gateway = Binary::spawn(
        &manifest(&upstream.base_url(), ""),
        &[("OA_BYPASS_LOG__FORMAT", "json"), ("RUST_LOG", "trace")],
    );
    let response = support::client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", bearer())
        .json(&json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), CHAT_JSON);
    let response = support::client()
        .get(gateway.url("/v1/files/file-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    gateway
        .wait_for_logs("two request lines", |logs| {
            logs.matches("\"target\":\"oa_bypass::request\"").count() >= 2
        })
        .await;

    let logs = gateway.settled_logs().await;
    let lines: Vec<Value> = logs
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"))
        })
        .collect();
    let requests: Vec<&Value> = lines
        .iter()
        .filter(|line| line["target"] == "oa_bypass::request")
        .collect();
    assert_eq!(requests.len(), 2, "{logs}");
    let chat = requests
        .iter()
        .find(|line| line["route"] == "/v1/chat/completions")
        .unwrap();
    assert_eq!(chat["method"], "POST");
    assert_eq!(chat["status"], 200);
    assert!(chat["duration_ms"].is_f64(), "{chat}");
    assert!(chat["upstream_ttfb_ms"].is_f64(), "{chat}");
    assert_eq!(chat["bytes_out"], CHAT_JSON.len());
    assert!(chat["bytes_in"].as_u64().unwrap() > 0);
    assert_eq!(chat["upstream_request_id"], "req_chat_1");
    assert_eq!(chat["key_hash"], support::sha256(KEY.as_bytes())[..8]);
    assert_eq!(chat["model"], "gpt-4o-mini");
    assert_eq!(chat["input_tokens"], 19);
    assert_eq!(chat["outcome"], "complete");
    assert!(chat["timestamp"].is_string() && chat["level"] == "INFO");
    let refused = requests
        .iter()
        .find(|line| line["route"] == "/v1/files/{file_id}")
        .unwrap();
    assert_eq!(refused["status"], 401);
    // Even at trace level, the key never appears.
    assert!(!logs.contains(KEY), "the key leaked into the logs");
}

/// An upstream on a raw socket that reads the request head, writes `answer`, and then
/// closes or stays silent.
async fn raw_upstream(answer: &'static [u8], then_close: bool) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let upstream = RawUpstream::start(move |mut stream| async move {
        if support::read_head(&mut stream, &mut Vec::new())
            .await
            .is_none()
        {
            return;
        }
        let _ = stream.write_all(answer).await;
        if !then_close {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    })
    .await;
    upstream.addr
}

#[tokio::test]
async fn upstream_errors_are_counted_by_kind() {
    // Silent after the request: a timeout (504). Broken off mid-body: a reset.
    let silent = raw_upstream(b"", false).await;
    let broken = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        true,
    )
    .await;
    let quick = |addr: std::net::SocketAddr| {
        manifest(&format!("http://{addr}"), "")
            .replace("read_timeout = \"5s\"", "read_timeout = \"300ms\"")
    };
    let gateway = Gateway::start(&quick(silent)).await;
    let (status, _) = post(&gateway, "/v1/embeddings", KEY, json!({})).await;
    assert_eq!(status, 504);
    let samples = parse_metrics(&settled(&gateway).await);
    assert_eq!(
        sample(
            &samples,
            r#"oa_bypass_upstream_errors_total{kind="timeout",route="/v1/embeddings"}"#
        ),
        1.0
    );

    let gateway = Gateway::start(&quick(broken)).await;
    let response = support::client()
        .post(gateway.url("/v1/embeddings"))
        .header("authorization", bearer())
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.bytes().await.is_err(),
        "a broken body must not look complete"
    );
    // Counted when the relay ends, which can be just after the client saw the break.
    let metrics = support::scrape_until(gateway.url("/metrics"), "the reset", |text| {
        text.contains(r#"oa_bypass_upstream_errors_total{route="/v1/embeddings",kind="reset"} 1"#)
    })
    .await;
    let samples = parse_metrics(&metrics);
    assert_eq!(sample(&samples, "oa_bypass_requests_in_flight{}"), 0.0);
}
