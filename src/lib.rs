//! oa-bypass: a self-hosted passthrough gateway for the OpenAI API.
//!
//! [`app`] builds the whole gateway from a [`Config`], so tests and the binary serve exactly
//! the same thing. A request goes: an engine (the accept loop, then the fast HTTP/1 engine or
//! hyper behind poem's router) → the pipeline (access, route, credential and limits, body
//! policy, the upstream request, send, answer rules, log line) → the upstream (connectors,
//! proxies, TLS and pools) and back. The phases are listed, in order, in the `pipeline`
//! module's documentation.
//!
//! The library's interface is what the binary and the integration tests use: the manifest
//! ([`config`], [`routes`]), the OpenAPI document ([`openapi`]), building and serving the
//! gateway, and logging. Everything else is the crate's own.

mod app;
pub mod config;
mod engine;
mod headers;
mod http1;
mod ledger;
mod message;
mod observe;
pub mod openapi;
mod pipeline;
mod realtime;

pub mod routes;
mod sse;
mod store;
mod upstream;

pub use app::{app, app_for_workers, App};
pub use config::{Config, ConfigError};
pub use engine::{server, tls::Tls};
pub use observe::log::{init as init_logging, Logging};
pub use openapi::HEALTH_TEXT;
pub use routes::{METRICS_PATH, READY_PATH};
