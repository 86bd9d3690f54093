//! Helpers for bench/run. Not part of the gateway.
//!
//!   benchkit sse-upstream ADDR EVENTS INTERVAL_MS
//!   benchkit slow-upstream ADDR DELAY_MS        -> a 1.4 KB chat answer, DELAY_MS after the head
//!   benchkit blob-upstream ADDR                 -> POST: reads the whole body; GET: streams
//!                                                  ?bytes=N bytes
//!   benchkit sse-client URL STREAMS             -> one JSON line: lag and time-to-first-byte
//!   benchkit crowd URL STREAMS SECONDS [READ]   -> opens STREAMS streams at once, prints
//!                                                  "holding N", measures event lag for SECONDS,
//!                                                  then one JSON line; READ=first: each client
//!                                                  stops reading after its first event
//!   benchkit startup BINARY PORT                -> ms from spawn to the first 200 on /health
//!   benchkit hyper-proxy ADDR UPSTREAM_URL      -> a bare reverse proxy on hyper alone
//!   benchkit tcp-relay ADDR UPSTREAM_ADDR       -> a bare byte relay: the floor of one more hop
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A helper binary has no library interface for `pub` to mark.
#![allow(unreachable_pub)]

mod clients;
mod floors;
mod upstreams;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Microseconds since the epoch: upstreams stamp events with it, clients subtract it.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| {
        args.get(i)
            .cloned()
            .unwrap_or_else(|| panic!("missing argument {i}"))
    };
    let number = |i: usize| -> u64 { arg(i).parse().unwrap() };
    match args.first().map(String::as_str) {
        Some("sse-upstream") => {
            let interval = Duration::from_millis(number(3));
            upstreams::sse(arg(1), number(2) as usize, interval).await
        }
        Some("slow-upstream") => upstreams::slow(arg(1), Duration::from_millis(number(2))).await,
        Some("blob-upstream") => upstreams::blob(arg(1)).await,
        Some("sse-client") => clients::sse(arg(1), number(2) as usize).await,
        Some("crowd") => {
            let read_all = args.get(4).is_none_or(|read| read != "first");
            clients::crowd(arg(1), number(2) as usize, number(3), read_all).await
        }
        Some("startup") => clients::startup(arg(1), number(2) as u16).await,
        Some("hyper-proxy") => {
            let (addr, upstream) = (arg(1), arg(2));
            tokio::task::spawn_blocking(move || floors::hyper_proxy(addr, upstream))
                .await
                .unwrap()
        }
        Some("tcp-relay") => {
            let (addr, upstream) = (arg(1), arg(2));
            tokio::task::spawn_blocking(move || floors::tcp_relay(addr, upstream))
                .await
                .unwrap()
        }
        _ => eprintln!("usage: see the top of bench/benchkit/main.rs"),
    }
}
