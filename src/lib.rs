//! oa-bypass: a self-hosted passthrough gateway for the OpenAI API.
//!
//! [`app`] builds the whole gateway from a [`Config`], so tests and the binary serve exactly
//! the same thing. A request goes: an engine ([`engine`]: the accept loop, then the fast
//! HTTP/1 engine or hyper behind poem's router) → the pipeline ([`pipeline`]: access, route,
//! credential and limits, body policy, the upstream request, send, answer rules, log line) →
//! the upstream ([`upstream`]: connectors, proxies, TLS and pools) and back. The phases are
//! listed, in order, in [`pipeline`]'s documentation.

mod app;
pub mod config;
pub mod engine;
pub mod headers;
pub mod http1;
pub mod observe;
pub mod openapi;
pub mod pipeline;
pub mod realtime;
pub mod routes;
pub mod store;
pub mod upstream;

pub use app::{app, app_for_workers, App};
pub use config::{Config, ConfigError};
pub use engine::server;
pub use openapi::HEALTH_TEXT;
pub use routes::{METRICS_PATH, READY_PATH};
