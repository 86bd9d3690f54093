//! Helpers for bench/run: an SSE upstream, an SSE client that measures per-event lag, a
//! holder of many open streams, and a start-up timer. Not part of the gateway.
//!
//!   benchkit sse-upstream ADDR EVENTS INTERVAL_MS
//!   benchkit sse-client URL STREAMS             -> one JSON line: lag and time-to-first-byte
//!   benchkit hold URL STREAMS SECONDS           -> prints "holding N" once all streams are open
//!   benchkit startup BINARY PORT                -> ms from spawn to the first 200 on /health
//!   benchkit blob-upstream ADDR                 -> POST: reads the whole body; GET: streams
//!                                                  ?bytes=N bytes
//!   benchkit hyper-proxy ADDR UPSTREAM_URL      -> a bare reverse proxy on hyper alone
//!   benchkit tcp-relay ADDR UPSTREAM_ADDR       -> a bare byte relay: the floor of one more hop
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

async fn sse_upstream(addr: String, events: usize, interval: Duration) {
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req| async move {
                let ticks = futures_util::stream::unfold(0usize, move |i| async move {
                    if i >= events {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(interval).await;
                    }
                    // Shaped like a Chat stream with include_usage: every chunk names the
                    // model and says "usage":null; the last one carries the usage object, so
                    // the gateway's usage tap does its real work.
                    let usage = if i + 1 == events {
                        "{\"prompt_tokens\":25,\"completion_tokens\":64,\"total_tokens\":89}"
                    } else {
                        "null"
                    };
                    let event = format!(
                        "data: {{\"i\":{i},\"t\":{},\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"delta\":{{\"content\":\"tok\"}}}}],\"usage\":{usage}}}\n\n",
                        now_us()
                    );
                    Some((Ok::<_, Infallible>(Frame::data(Bytes::from(event))), i + 1))
                });
                Ok::<_, Infallible>(
                    hyper::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(StreamBody::new(ticks))
                        .unwrap(),
                )
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// An upstream for big transfers: POST bodies are read to the end and counted; GET answers
/// with `?bytes=N` bytes, generated as they are sent.
async fn blob_upstream(addr: String) {
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    type Chunk = Result<Frame<Bytes>, Infallible>;
                    let body: http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible> =
                        if req.method() == hyper::Method::POST {
                            let mut incoming = req.into_body();
                            let mut total = 0u64;
                            while let Some(frame) =
                                http_body_util::BodyExt::frame(&mut incoming).await
                            {
                                if let Ok(data) = frame.unwrap().into_data() {
                                    total += data.len() as u64;
                                }
                            }
                            http_body_util::BodyExt::boxed_unsync(http_body_util::Full::new(
                                Bytes::from(format!("{{\"bytes\":{total}}}")),
                            ))
                        } else {
                            let total: u64 = req
                                .uri()
                                .query()
                                .and_then(|q| q.strip_prefix("bytes="))
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(0);
                            let block = Bytes::from(vec![b'x'; 64 * 1024]);
                            let chunks = futures_util::stream::unfold(0u64, move |sent| {
                                let block = block.clone();
                                async move {
                                    if sent >= total {
                                        return None;
                                    }
                                    let n = (total - sent).min(block.len() as u64);
                                    let frame: Chunk = Ok(Frame::data(block.slice(..n as usize)));
                                    Some((frame, sent + n))
                                }
                            });
                            http_body_util::BodyExt::boxed_unsync(StreamBody::new(chunks))
                        };
                    Ok::<_, Infallible>(hyper::Response::new(body))
                },
            );
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Reads one SSE stream; returns (lags in µs, time to first byte in µs, events in order).
async fn read_stream(client: &reqwest::Client, url: &str) -> (Vec<u64>, u64, bool) {
    let start = Instant::now();
    let response = client
        .post(url)
        .header(
            "authorization",
            "Bearer sk-bench-0000000000000000000000000000",
        )
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#)
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut lags = Vec::new();
    let mut ttfb = None;
    let mut expected = 0u64;
    let mut in_order = true;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        let arrived = now_us();
        ttfb.get_or_insert_with(|| start.elapsed().as_micros() as u64);
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let field = |name: &str| -> u64 {
                let key = format!("\"{name}\":");
                let at = text.find(&key).unwrap() + key.len();
                text[at..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .unwrap()
            };
            if field("i") != expected {
                in_order = false;
            }
            expected += 1;
            lags.push(arrived.saturating_sub(field("t")));
        }
    }
    (lags, ttfb.unwrap_or(0), in_order)
}

async fn sse_client(url: String, streams: usize) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut lags = Vec::new();
    let mut ttfbs = Vec::new();
    let mut in_order = true;
    for _ in 0..streams {
        let (stream_lags, ttfb, ordered) = read_stream(&client, &url).await;
        lags.extend(stream_lags);
        ttfbs.push(ttfb);
        in_order &= ordered;
    }
    lags.sort_unstable();
    ttfbs.sort_unstable();
    println!(
        "{{\"events\":{},\"lag_p50_us\":{},\"lag_p99_us\":{},\"ttfb_p50_us\":{},\"in_order\":{}}}",
        lags.len(),
        percentile(&lags, 50.0),
        percentile(&lags, 99.0),
        percentile(&ttfbs, 50.0),
        in_order
    );
}

async fn hold(url: String, streams: usize, seconds: u64) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(streams);
    for _ in 0..streams {
        let client = client.clone();
        let url = url.clone();
        let ready_tx = ready_tx.clone();
        tokio::spawn(async move {
            let response = client
                .post(&url)
                .header("authorization", "Bearer sk-bench")
                .body("{\"stream\":true}")
                .send()
                .await
                .unwrap();
            let mut body = response.bytes_stream();
            body.next().await;
            let _ = ready_tx.send(()).await;
            while body.next().await.is_some() {}
        });
    }
    for _ in 0..streams {
        ready_rx.recv().await.unwrap();
    }
    println!("holding {streams}");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
}

async fn startup(binary: String, port: u16) {
    let start = Instant::now();
    let mut child = tokio::process::Command::new(&binary)
        .env("OA_BYPASS_SERVER__PORT", port.to_string())
        .env("OA_BYPASS_SERVER__HOST", "127.0.0.1")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://127.0.0.1:{port}/health");
    loop {
        if let Ok(response) = client.get(&url).send().await {
            if response.status().is_success() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    println!("{:.1}", start.elapsed().as_secs_f64() * 1000.0);
    child.kill().await.unwrap();
}

/// A bare reverse proxy on hyper alone: hyper's HTTP/1 server and hyper-util's pooled client,
/// one current-thread runtime per core on a shared `SO_REUSEPORT` port, as the gateway runs.
/// No routing, checks, metrics or logs: the floor any hyper-based gateway starts from,
/// measured in the same run as the gateway and nginx.
fn hyper_proxy(addr: String, upstream: String) {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let upstream: &'static str = Box::leak(upstream.trim_end_matches('/').into());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(hyper_proxy_worker(addr, upstream))
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

type HyperClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::combinators::BoxBody<Bytes, hyper::Error>,
>;

async fn hyper_proxy_worker(addr: std::net::SocketAddr, upstream: &'static str) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket.bind(addr).unwrap();
    let listener = socket.listen(1024).unwrap();
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: HyperClient = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector);
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        let client = client.clone();
        let service =
            hyper::service::service_fn(move |req| hyper_forward(client.clone(), upstream, req));
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}

async fn hyper_forward(
    client: HyperClient,
    upstream: &'static str,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<http_body_util::combinators::BoxBody<Bytes, hyper::Error>>, Infallible> {
    use http_body_util::BodyExt;
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = format!("{upstream}{path}").parse().unwrap();
    parts.headers.remove(http::header::HOST);
    match client
        .request(http::Request::from_parts(parts, body.boxed()))
        .await
    {
        Ok(response) => Ok(response.map(BodyExt::boxed)),
        Err(_) => {
            let empty = http_body_util::Empty::new().map_err(|never| match never {});
            let mut response = http::Response::new(empty.boxed());
            *response.status_mut() = http::StatusCode::BAD_GATEWAY;
            Ok(response)
        }
    }
}

/// The floor of one more hop: a byte relay with a blocked thread each way, no parsing, no
/// event loop. What it adds to an SSE event's lag is what the machine charges for waking one
/// more sleeping thread and one more loopback write: about the least a proxy in user space
/// that sleeps when idle can add.
fn tcp_relay(addr: String, upstream: String) {
    let listener = std::net::TcpListener::bind(&addr).unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    for client in listener.incoming() {
        let client = client.unwrap();
        let server = std::net::TcpStream::connect(&upstream).unwrap();
        client.set_nodelay(true).unwrap();
        server.set_nodelay(true).unwrap();
        let (client_back, server_back) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || pump(client, server));
        std::thread::spawn(move || pump(server_back, client_back));
    }
}

fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| {
        args.get(i)
            .cloned()
            .unwrap_or_else(|| panic!("missing argument {i}"))
    };
    match args.first().map(String::as_str) {
        Some("sse-upstream") => {
            sse_upstream(
                arg(1),
                arg(2).parse().unwrap(),
                Duration::from_millis(arg(3).parse().unwrap()),
            )
            .await
        }
        Some("sse-client") => sse_client(arg(1), arg(2).parse().unwrap()).await,
        Some("hold") => hold(arg(1), arg(2).parse().unwrap(), arg(3).parse().unwrap()).await,
        Some("startup") => startup(arg(1), arg(2).parse().unwrap()).await,
        Some("blob-upstream") => blob_upstream(arg(1)).await,
        Some("hyper-proxy") => {
            let (addr, upstream) = (arg(1), arg(2));
            tokio::task::spawn_blocking(move || hyper_proxy(addr, upstream))
                .await
                .unwrap()
        }
        Some("tcp-relay") => {
            let (addr, upstream) = (arg(1), arg(2));
            tokio::task::spawn_blocking(move || tcp_relay(addr, upstream))
                .await
                .unwrap()
        }
        _ => eprintln!("usage: see the top of bench/benchkit.rs"),
    }
}
