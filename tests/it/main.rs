//! The integration tests, one binary (the crate links once): a module per area, each running
//! the real gateway against real upstreams on loopback ports, with real clients. The shared
//! parts are in [`support`], by concern.
//!
//! `browser` is `#[ignore]`d: it needs Chromium, which `.ci/run` installs, and runs there with
//! `cargo test --test it -- --ignored browser::`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A test binary has no library interface for `pub` to mark.
#![allow(unreachable_pub)]

mod support;

mod access;
mod browser;
mod budgets;
mod cli;
mod console;
mod custody;
mod dashboard;
mod deploy;
mod examples;
mod fast_engine;
mod faults;
mod hostile;
mod large_bodies;
mod limits;
mod logging;
mod manifest_spec;
mod mounts;
mod observability;
mod openapi;
mod operations;
mod outbound;
mod passthrough;
mod properties;
mod readmes;
mod realtime;
mod routing;
mod sdk_python;
mod server_timing;
mod slow_clients;
mod sse_keepalive;
mod store;
mod stream_usage;
mod streaming;
mod team_keys;
mod traces;
mod upstream_tls;
