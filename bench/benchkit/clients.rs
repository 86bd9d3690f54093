//! Clients for bench/run: per-event lag, a crowd of open streams, start-up time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::now_us;

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

/// Reads `streams` event streams one after another: per-event lag and time to first byte.
pub async fn sse(url: String, streams: usize) {
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

/// Opens `streams` event streams at once (at most 256 handshakes in flight, or
/// `CROWD_OPENING`), prints "holding N" once every one has its first event, then for `seconds` records each event's
/// lag (arrival less the upstream's stamp). One JSON line: how many opened, errors, the time
/// to open them all, and the lag percentiles while all were open. With `read_all` false,
/// each client stops reading after its first event and holds its stream open unread, so the
/// proxy's buffers and the sockets' fill up and push back.
pub async fn crowd(url: String, streams: usize, seconds: u64, read_all: bool) {
    // Handshakes in flight at once: more would overflow the listeners' accept queues, and a
    // dropped SYN costs a second's retransmit, which says nothing about the proxy.
    // `CROWD_OPENING=N` sets it (as many as the streams: no limit, as an asyncio client).
    let opening: usize = std::env::var("CROWD_OPENING")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let opening = Arc::new(tokio::sync::Semaphore::new(opening));
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let (measure_tx, measure_rx) = tokio::sync::watch::channel(Phase::Opening);
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let (client, url, opening) = (client.clone(), url.clone(), Arc::clone(&opening));
            let (opened_tx, mut phase) = (opened_tx.clone(), measure_rx.clone());
            tokio::spawn(async move {
                let permit = opening.acquire_owned().await.unwrap();
                let sent = client
                    .post(&url)
                    .header("authorization", "Bearer sk-bench")
                    .header("content-type", "application/json")
                    .body(r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#)
                    .send()
                    .await;
                let mut body = match sent {
                    Ok(response) if response.status().is_success() => response.bytes_stream(),
                    _ => {
                        let _ = opened_tx.send(false);
                        return (Vec::new(), true);
                    }
                };
                let first = body.next().await;
                drop(permit);
                let _ = opened_tx.send(matches!(first, Some(Ok(_))));
                if !read_all {
                    let _ = phase.wait_for(|phase| *phase == Phase::Done).await;
                    return (Vec::new(), false);
                }
                let mut lags = Vec::new();
                let mut buffer = Vec::new();
                loop {
                    let chunk = tokio::select! {
                        chunk = body.next() => chunk,
                        _ = phase.wait_for(|phase| *phase == Phase::Done) => return (lags, false),
                    };
                    let Some(Ok(chunk)) = chunk else {
                        // Cut before the window closed.
                        return (lags, true);
                    };
                    let arrived = now_us();
                    buffer.extend_from_slice(&chunk);
                    while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                        let event: Vec<u8> = buffer.drain(..end + 2).collect();
                        if *phase.borrow() == Phase::Measuring {
                            if let Some(sent) = stamp(&event) {
                                lags.push(arrived.saturating_sub(sent));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    drop(opened_tx);
    let (mut opened, mut failed) = (0usize, 0usize);
    // A stream that failed to open also ends its task as cut: `cut` counts both.
    while opened + failed < streams {
        match opened_rx.recv().await {
            Some(true) => opened += 1,
            Some(false) => failed += 1,
            None => break,
        }
    }
    let open_ms = start.elapsed().as_secs_f64() * 1000.0;
    println!("holding {opened}");
    measure_tx.send_replace(Phase::Measuring);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measure_tx.send_replace(Phase::Done);
    let mut lags = Vec::new();
    let mut cut = 0usize;
    for task in tasks {
        let (stream_lags, was_cut) = task.await.unwrap();
        lags.extend(stream_lags);
        cut += usize::from(was_cut);
    }
    lags.sort_unstable();
    println!(
        "{{\"streams\":{streams},\"opened\":{opened},\"errors\":{},\"open_ms\":{open_ms:.0},\"events\":{},\"lag_p50_us\":{},\"lag_p99_us\":{},\"lag_max_us\":{}}}",
        cut,
        lags.len(),
        percentile(&lags, 50.0),
        percentile(&lags, 99.0),
        lags.last().copied().unwrap_or(0),
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Opening,
    Measuring,
    Done,
}

/// The `"t":` stamp of an event, in µs since the epoch.
fn stamp(event: &[u8]) -> Option<u64> {
    let at = event.windows(4).position(|w| w == b"\"t\":")? + 4;
    let digits = event[at..].iter().take_while(|b| b.is_ascii_digit());
    let text: Vec<u8> = digits.copied().collect();
    std::str::from_utf8(&text).ok()?.parse().ok()
}

/// Milliseconds from spawning `binary` to its first 200 on `/health`.
pub async fn startup(binary: String, port: u16) {
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
