//! Clients of the gateway: a plain HTTP client, raw exchanges on a socket, and the reads of
//! its own endpoints (metrics, the OpenAPI document) that tests wait on.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{bearer, eventually, Gateway, LOG_DEADLINE};

/// A plain HTTP client that ignores any proxy settings of the machine.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A client that speaks HTTP/2 from the first byte (prior knowledge, no upgrade), as gRPC-style
/// clients and some SDK transports do.
pub fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

/// `GET url` with the test key, sent by [`client`].
pub async fn get_with_key(url: impl reqwest::IntoUrl) -> reqwest::Response {
    client()
        .get(url)
        .header("authorization", bearer())
        .send()
        .await
        .unwrap()
}

/// The whole seconds of a response's `Retry-After`.
pub fn retry_after(response: &reqwest::Response) -> u64 {
    let value = response.headers()["retry-after"].to_str().unwrap();
    value.parse().unwrap()
}

/// Checks a refusal by a `[limits]` rate or cap: 429 with `Retry-After` (1–60 s), the
/// error's `code` and type, and a message naming `setting`. Returns the `Retry-After` seconds.
pub async fn assert_429(response: reqwest::Response, code: &str, setting: &str) -> u64 {
    assert_eq!(response.status(), 429);
    let retry_after = retry_after(&response);
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code);
    assert_eq!(body["error"]["type"], "requests");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(setting),
        "{body}"
    );
    retry_after
}

/// `gateway`'s `/openapi.json`, checked to be a 200 in JSON.
pub async fn openapi_document(gateway: &Gateway) -> serde_json::Value {
    let response = client()
        .get(gateway.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

/// The exposition at `url` (a gateway's `/metrics`), checked to be a 200 in OpenMetrics text.
pub async fn scrape(url: impl reqwest::IntoUrl) -> String {
    let response = client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    response.text().await.unwrap()
}

/// Scrapes `url` (a gateway's `/metrics`) until `holds` is true of what it shows, and returns
/// that; after [`LOG_DEADLINE`], fails the test with `what` and the last scrape. An answer's
/// counters are written when its body is finished, which can be just after the client read it.
pub async fn scrape_until(
    url: impl reqwest::IntoUrl + Clone,
    what: &str,
    holds: impl Fn(&str) -> bool,
) -> String {
    let what = format!("{what} in the metrics");
    eventually(&what, LOG_DEADLINE, || async {
        let metrics = scrape(url.clone()).await;
        if holds(&metrics) {
            Ok(metrics)
        } else {
            Err(metrics)
        }
    })
    .await
}

/// Scrapes `url` once no request is in flight and no stream open: every answer's end-of-body
/// counters (durations, bytes, tokens) are written before its gauges are let go.
pub async fn scrape_settled(url: impl reqwest::IntoUrl + Clone) -> String {
    scrape_until(url, "no request in flight", |metrics| {
        metrics.contains("\noa_bypass_requests_in_flight 0\n")
            && metrics.contains("\noa_bypass_open_streams 0\n")
    })
    .await
}

/// Starts a streaming Chat Completions request through `gateway`, with a key.
pub async fn start_chat_stream(gateway: &Gateway) -> reqwest::Response {
    client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", bearer())
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","stream":true,"messages":[]}"#)
        .send()
        .await
        .unwrap()
}

/// Sends `request` as raw bytes (no client normalisation of the path) and returns the whole
/// answer as text. The request should say `Connection: close`.
pub async fn raw_exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// A raw `GET path` with the test key, answered in full.
pub async fn raw_get(addr: SocketAddr, path: &str) -> String {
    raw_exchange(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            bearer()
        ),
    )
    .await
}

/// One HTTP/1.1 response read off a keep-alive connection.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub status: u16,
    /// Lowercase names and values, sorted; `date` left out (it differs by the second).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Reads one response from `stream`, with `pending` holding bytes read ahead.
pub async fn read_answer(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Answer {
    loop {
        let mut raw = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut raw);
        if let httparse::Status::Complete(head_len) = response.parse(pending).unwrap() {
            let mut headers: Vec<(String, String)> = response
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .filter(|(name, _)| name != "date")
                .collect();
            headers.sort();
            let status = response.code.unwrap();
            let length = headers
                .iter()
                .find(|(name, _)| name == "content-length")
                .map(|(_, value)| value.parse::<usize>().unwrap());
            let chunked = headers
                .iter()
                .any(|(name, value)| name == "transfer-encoding" && value == "chunked");
            pending.drain(..head_len);
            let body = if chunked {
                read_chunked(stream, pending).await
            } else {
                let length = length.unwrap_or(0);
                while pending.len() < length {
                    read_more(stream, pending).await;
                }
                pending.drain(..length).collect()
            };
            return Answer {
                status,
                headers,
                body,
            };
        }
        read_more(stream, pending).await;
    }
}

async fn read_more(stream: &mut TcpStream, pending: &mut Vec<u8>) {
    let mut buf = [0u8; 16384];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("no answer within 5 s")
        .unwrap();
    assert!(n > 0, "the connection closed mid-answer");
    pending.extend_from_slice(&buf[..n]);
}

async fn read_chunked(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(at) = pending.windows(2).position(|w| w == b"\r\n") {
                break at;
            }
            read_more(stream, pending).await;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&pending[..line_end]).unwrap(), 16).unwrap();
        while pending.len() < line_end + 2 + size + 2 {
            read_more(stream, pending).await;
        }
        body.extend_from_slice(&pending[line_end + 2..line_end + 2 + size]);
        pending.drain(..line_end + 2 + size + 2);
        if size == 0 {
            return body;
        }
    }
}

/// A WebSocket session with the gateway.
pub type Session = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Opens a Realtime WebSocket (`/v1/realtime?model=gpt-realtime`) to the gateway at `addr`,
/// with the given extra headers.
pub async fn connect(
    addr: SocketAddr,
    headers: &[(&str, String)],
) -> Result<
    (
        Session,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let mut request = http::Request::builder()
        .uri(format!("ws://{addr}/v1/realtime?model=gpt-realtime"))
        .header("host", addr.to_string())
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        );
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let stream = TcpStream::connect(addr).await.unwrap();
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    tokio_tungstenite::client_async_with_config(request.body(()).unwrap(), stream, Some(config))
        .await
}
