//! Clients that are slow or greedy on purpose cannot starve the others.

use std::time::Duration;

use crate::support;
use crate::support::{bearer, Gateway, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn manifest(upstream: &Upstream, server: &str) -> String {
    format!(
        "[server]\n{server}\n{}",
        support::test_manifest(&upstream.base_url(), "")
    )
}

/// Reads what the server sends until it closes the connection or `limit` passes.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()?;
    Some(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn slowloris_connections_are_cut_and_real_clients_are_served() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&manifest(&upstream, "header_read_timeout = \"1s\"")).await;
    // 300 connections that trickle a request head and never finish it.
    let mut attackers = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        stream
            .write_all(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n")
            .await
            .unwrap();
        attackers.push(stream);
    }
    let drip = tokio::spawn(async move {
        for _ in 0..10 {
            for stream in attackers.iter_mut() {
                let _ = stream.write_all(b"X").await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        attackers
    });
    // Meanwhile a real client is served at once, every time.
    for _ in 0..5 {
        let response = tokio::time::timeout(
            Duration::from_secs(2),
            support::client()
                .get(gateway.url("/v1/models"))
                .header("authorization", bearer())
                .send(),
        )
        .await
        .expect("a real client waited behind the slowloris connections")
        .unwrap();
        assert_eq!(response.status(), 200);
    }
    let mut attackers = drip.await.unwrap();
    // Past header_read_timeout every trickling connection has been closed.
    let mut closed = 0;
    for stream in attackers.iter_mut() {
        if read_until_closed(stream, Duration::from_secs(3))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 300,
        "only {closed} of 300 slowloris connections were cut"
    );
}

#[tokio::test]
async fn a_stalled_request_body_is_408_naming_the_setting() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&manifest(&upstream, "body_read_timeout = \"300ms\"")).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"input\":",
        bearer()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("no answer to a stalled body");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("server.body_read_timeout (300ms)"),
        "{answer}"
    );
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&manifest(&upstream, "max_header_bytes = \"16KiB\"")).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let big = "a".repeat(64 * 1024);
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\nX-Big: {big}\r\n\r\n",
        bearer()
    );
    let _ = stream.write_all(request.as_bytes()).await;
    let answer = read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .unwrap_or_default();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    assert!(upstream.requests().is_empty());
}

async fn request_on(stream: &mut TcpStream) -> String {
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\n\r\n",
        bearer()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn max_connections_makes_new_clients_wait_for_a_free_slot() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&manifest(&upstream, "max_connections = 2")).await;
    let mut first = TcpStream::connect(gateway.addr).await.unwrap();
    let mut second = TcpStream::connect(gateway.addr).await.unwrap();
    assert!(request_on(&mut first).await.starts_with("HTTP/1.1 200"));
    assert!(request_on(&mut second).await.starts_with("HTTP/1.1 200"));

    let mut third = TcpStream::connect(gateway.addr).await.unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(500), request_on(&mut third)).await;
    assert!(
        waiting.is_err(),
        "a third connection was served past max_connections"
    );
    drop(first);
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("the waiting client was not served once a slot freed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}
