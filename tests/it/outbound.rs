//! How the gateway reaches the upstream: pooled connections and the outbound proxy settings.

use std::sync::{Arc, Mutex};

use crate::support;
use crate::support::{bearer, read_head, Binary, Gateway, RawUpstream, Upstream};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn sequential_requests_reuse_one_pooled_upstream_connection() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    for _ in 0..5 {
        // A fresh client connection each time: only the gateway's pool can explain reuse.
        let response = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(gateway.url("/v1/embeddings"))
            .header("authorization", bearer())
            .body("{}")
            .send()
            .await
            .unwrap();
        response.bytes().await.unwrap();
    }
    let peers: Vec<String> = upstream.requests().into_iter().map(|r| r.peer).collect();
    assert_eq!(peers.len(), 5);
    assert!(
        peers.iter().all(|peer| peer == &peers[0]),
        "each request opened a new upstream connection: {peers:?}"
    );
}

/// A plain-HTTP forward proxy that records each request line and answers it itself.
async fn recording_proxy() -> (String, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&lines);
    let proxy = RawUpstream::start(move |mut socket| {
        let seen = Arc::clone(&seen);
        async move {
            let mut pending = Vec::new();
            if read_head(&mut socket, &mut pending).await.is_none() {
                return;
            }
            let head = String::from_utf8_lossy(&pending).into_owned();
            seen.lock()
                .unwrap()
                .push(head.lines().next().unwrap_or_default().to_owned());
            let body = "{\"via\":\"proxy\"}";
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(answer.as_bytes()).await.unwrap();
        }
    })
    .await;
    (proxy.base_url(), lines)
}

#[tokio::test]
async fn upstream_proxy_setting_routes_requests_through_the_proxy() {
    let (proxy, lines) = recording_proxy().await;
    let manifest = support::test_manifest(
        "http://upstream.example:8000",
        &format!("proxy = \"{proxy}\""),
    );
    let gateway = Gateway::start(&manifest).await;
    let response = support::get_with_key(gateway.url("/v1/models?a=1")).await;
    assert_eq!(response.text().await.unwrap(), "{\"via\":\"proxy\"}");
    assert_eq!(
        lines.lock().unwrap().as_slice(),
        ["GET http://upstream.example:8000/v1/models?a=1 HTTP/1.1"]
    );
}

#[tokio::test]
async fn standard_proxy_variables_apply_when_no_proxy_is_set() {
    let (proxy, lines) = recording_proxy().await;
    let gateway = Binary::spawn(
        &support::test_manifest("http://upstream.example:8000", ""),
        &[("HTTP_PROXY", proxy.as_str()), ("NO_PROXY", "")],
    );
    let response = support::get_with_key(gateway.url("/v1/models")).await;
    assert_eq!(response.text().await.unwrap(), "{\"via\":\"proxy\"}");
    assert_eq!(
        lines.lock().unwrap().as_slice(),
        ["GET http://upstream.example:8000/v1/models HTTP/1.1"]
    );
}
