//! A quarter-gigabyte each way passes through the real binary in flat memory.
//!
//! The gateway runs as its own process so its peak resident memory (VmHWM) can be read from
//! /proc and compared with its resident memory before the transfer. A gateway that buffered a
//! body would grow by at least the body's size.

use crate::support;
use crate::support::{
    bearer, client, pattern_sha256, pattern_stream, proc_status_kib, Binary, Upstream,
};
use futures_util::StreamExt;
use poem::{Body, Response};
use sha2::{Digest, Sha256};

const SIZE: u64 = 256 << 20;
const CHUNK: usize = 64 << 10;
/// Allowed growth of the gateway's peak RSS over its RSS before the transfer. Buffering
/// would need 256 MiB; socket buffers, allocator slack and the connection pool need a few.
const MAX_GROWTH_KIB: u64 = 16 << 10;

/// Warms the gateway up (connection pool, first-request allocations) and returns its RSS.
async fn settled_rss(gateway: &Binary) -> u64 {
    for _ in 0..3 {
        let response = support::get_with_key(gateway.url("/v1/models")).await;
        response.bytes().await.unwrap();
    }
    proc_status_kib(gateway.pid(), "VmRSS")
}

#[tokio::test]
async fn upload_of_256_mib_streams_in_flat_memory() {
    let upstream = Upstream::echo().await;
    let gateway = Binary::spawn(
        &support::test_manifest(&upstream.base_url(), "[limits]\nmax_upload_body = \"1GiB\""),
        &[],
    );
    let before = settled_rss(&gateway).await;
    let response = client()
        .post(gateway.url("/v1/files"))
        .header("authorization", bearer())
        .header("content-type", "multipart/form-data; boundary=big")
        .header("content-length", SIZE.to_string())
        .body(reqwest::Body::wrap_stream(pattern_stream(SIZE, CHUNK)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let peak = proc_status_kib(gateway.pid(), "VmHWM");

    let rec = upstream.last();
    assert_eq!(rec.body_len, SIZE);
    assert_eq!(rec.body_sha256, pattern_sha256(SIZE, CHUNK));
    assert_eq!(
        rec.header("content-length"),
        Some(SIZE.to_string().as_str())
    );
    let growth = peak.saturating_sub(before);
    println!("upload: RSS before {before} KiB, peak {peak} KiB, growth {growth} KiB");
    assert!(
        growth < MAX_GROWTH_KIB,
        "the gateway grew by {growth} KiB while forwarding {} MiB",
        SIZE >> 20
    );
}

#[tokio::test]
async fn download_of_256_mib_streams_in_flat_memory() {
    let upstream = Upstream::start(|rec| {
        if rec.path_and_query.ends_with("/content") {
            Response::builder()
                .header("content-type", "application/octet-stream")
                .header("content-length", SIZE.to_string())
                .body(Body::from_bytes_stream(pattern_stream(SIZE, CHUNK)))
        } else {
            Response::builder().body("{}")
        }
    })
    .await;
    let gateway = Binary::spawn(&support::test_manifest(&upstream.base_url(), ""), &[]);
    let before = settled_rss(&gateway).await;
    let response = support::get_with_key(gateway.url("/v1/files/file-big/content")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], SIZE.to_string());
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    let peak = proc_status_kib(gateway.pid(), "VmHWM");
    assert_eq!(len, SIZE);
    assert_eq!(
        support::hex(&hasher.finalize()),
        pattern_sha256(SIZE, CHUNK)
    );
    let growth = peak.saturating_sub(before);
    println!("download: RSS before {before} KiB, peak {peak} KiB, growth {growth} KiB");
    assert!(
        growth < MAX_GROWTH_KIB,
        "the gateway grew by {growth} KiB while forwarding {} MiB",
        SIZE >> 20
    );
}
