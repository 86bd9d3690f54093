//! Real parts for integration tests, by concern: upstreams on loopback ports, the gateway
//! (in-process or as the built binary), clients of it, and the manifests and key tests use.
#![allow(dead_code)]

mod client;
mod debian;
mod gateway;
mod manifests;
pub mod python;
mod redis;
mod upstreams;
mod wait;

pub use client::*;
pub use debian::*;
pub use gateway::*;
pub use manifests::*;
pub use redis::*;
pub use upstreams::*;
pub use wait::*;
