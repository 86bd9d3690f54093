//! Logging: the tracing subscriber and the one line written per request.
//!
//! A request line carries method, route template, status, duration and byte counts. It must
//! never carry a header value, a body, or the raw path (which could hold an ID the operator
//! does not want in logs): the route template is logged instead.

use std::sync::Arc;

use http::Method;
use tokio::time::Instant;
use tracing_subscriber::EnvFilter;

use crate::proxy::body::UploadProgress;

/// Installs the global subscriber: `RUST_LOG` if set, else `info`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_target(true)
        .try_init();
}

/// How a forwarded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole answer reached the client.
    Complete,
    /// The client went away before the answer ended; the upstream request was dropped.
    ClientAborted,
    /// The upstream failed mid-body; the client's connection was aborted.
    UpstreamBodyError,
    /// The upstream went silent mid-body past the read timeout.
    UpstreamBodyTimeout,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientAborted => "client_aborted",
            Outcome::UpstreamBodyError => "upstream_body_error",
            Outcome::UpstreamBodyTimeout => "upstream_body_timeout",
        }
    }
}

/// The log line of one forwarded request, written when the response body is finished or
/// dropped, so it reports what was really delivered.
#[derive(Debug)]
pub struct RequestLog {
    pub method: Method,
    pub route: Arc<str>,
    pub status: u16,
    pub start: Instant,
    pub upload: Arc<UploadProgress>,
    pub bytes_out: u64,
    pub outcome: Outcome,
    /// The request's place under the concurrency limits, released with this line.
    pub admission: crate::limits::Admission,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            target: "oa_bypass::request",
            method = %self.method,
            route = %self.route,
            status = self.status,
            duration_ms = format_args!("{duration_ms:.1}"),
            bytes_in = self.upload.bytes(),
            bytes_out = self.bytes_out,
            outcome = self.outcome.as_str(),
        );
    }
}

/// Logs a request the gateway answered itself, with the reason (never a key or a body).
pub fn log_rejected(method: &Method, route: &str, status: u16, start: Instant, reason: &str) {
    let duration_ms = start.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(
        target: "oa_bypass::request",
        method = %method,
        route = %route,
        status,
        duration_ms = format_args!("{duration_ms:.1}"),
        outcome = "gateway_error",
        reason,
    );
}
