//! Upstreams for bench/run: event streams, big bodies, a slow JSON answer.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::now_us;

/// Answers every request with EVENTS chat-stream events, INTERVAL apart, each stamped with
/// its time of sending.
pub async fn sse(addr: String, events: usize, interval: Duration) {
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
pub async fn blob(addr: String) {
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

/// A chat answer of about 1.4 KB, as bench/run's nginx upstream gives, `delay` after the
/// request arrives: an upstream that takes its time, as a model does.
pub async fn slow(addr: String, delay: Duration) {
    let content = "This is a canned answer used to benchmark the proxy path; it is about as long as a short reply. ".repeat(9);
    let answer = Bytes::from(format!(
        "{{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{content}\",\"refusal\":null}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":25,\"completion_tokens\":120,\"total_tokens\":145}}}}"
    ));
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        let answer = answer.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let answer = answer.clone();
                    async move {
                        // The request body is read first, as a model reads its prompt.
                        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                        tokio::time::sleep(delay).await;
                        let response = hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(answer))
                            .unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
