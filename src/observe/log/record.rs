//! The one record of a request's log line: opened when the request's head arrives, filled in
//! by the phase that learns each part, and written once, when its answer is done or the
//! gateway refuses it.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use super::line::{self, name};
use crate::observe::key::KeyPrefix;
use crate::observe::usage::Usage;

/// How a forwarded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
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
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientAborted => "client_aborted",
            Outcome::UpstreamBodyError => "upstream_body_error",
            Outcome::UpstreamBodyTimeout => "upstream_body_timeout",
        }
    }
}

/// What one request's line says. It never holds a key, a header value but the upstream's
/// request ID, a body, or the raw path (which could hold an ID the operator does not want in
/// logs): the route template stands for the path.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) method: Method,
    /// The route template, or one of the gateway's own names for a path no route has.
    pub(crate) route: Arc<str>,
    pub(crate) start: Instant,
    /// Whose request: its key's hash prefix, once phase 3 has read one.
    pub(crate) key: Option<KeyPrefix>,
    /// Its key's name, when it is one of `[keys]`.
    pub(crate) key_name: Option<Arc<str>>,
    /// The mount that served it, when not the default.
    pub(crate) mount: Option<Arc<str>>,
    /// The environment variable of the key the gateway lent it, when it holds the keys.
    pub(crate) upstream_key: Option<Arc<str>>,
    /// Where `[models]` sent its last attempt (`mount/model`).
    pub(crate) target: Option<Arc<str>>,
    /// Attempts made, when it could have gone elsewhere (`[models]`, `retry`); 0 otherwise.
    pub(crate) attempts: u8,
    pub(crate) status: u16,
    /// From sending the request upstream to the upstream's response headers.
    pub(crate) upstream_ttfb: Duration,
    /// The upstream's `x-request-id`, which OpenAI support asks for.
    pub(crate) upstream_request_id: Option<HeaderValue>,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) outcome: Outcome,
}

impl Record {
    /// The record of a `method` request to `route` whose head arrived at `start`.
    pub(crate) fn open(method: Method, route: Arc<str>, start: Instant) -> Record {
        Record {
            method,
            route,
            start,
            key: None,
            key_name: None,
            mount: None,
            upstream_key: None,
            target: None,
            attempts: 0,
            status: 0,
            upstream_ttfb: Duration::ZERO,
            upstream_request_id: None,
            bytes_in: 0,
            bytes_out: 0,
            outcome: Outcome::ClientAborted,
        }
    }

    /// Writes the line of a forwarded request, `elapsed` after it began, with the usage its
    /// answer reported.
    pub(crate) fn write_forwarded(&self, elapsed: Duration, usage: Option<&Usage>) {
        line::write(|fields| {
            fields.bare(name!("method"), self.method.as_str());
            fields.bare(name!("route"), &self.route);
            fields.number(name!("status"), u64::from(self.status));
            fields.millis(name!("duration_ms"), elapsed);
            fields.millis(name!("upstream_ttfb_ms"), self.upstream_ttfb);
            fields.number(name!("bytes_in"), self.bytes_in);
            fields.number(name!("bytes_out"), self.bytes_out);
            fields.word(name!("outcome"), self.outcome.as_str().as_bytes());
            let request_id = (self.upstream_request_id.as_ref()).and_then(|id| id.to_str().ok());
            if let Some(id) = request_id {
                fields.quoted(name!("upstream_request_id"), id);
            }
            if let Some(key) = &self.key {
                fields.word(name!("key_hash"), key.hex());
            }
            if let Some(name) = &self.key_name {
                fields.quoted(name!("key"), name);
            }
            if let Some(mount) = &self.mount {
                fields.quoted(name!("mount"), mount);
            }
            if let Some(var) = &self.upstream_key {
                fields.quoted(name!("upstream_key"), var);
            }
            self.write_attempts(fields);
            if let Some(usage) = usage {
                if let Some(model) = &usage.model {
                    fields.quoted(name!("model"), model);
                }
                fields.number(name!("input_tokens"), usage.input);
                fields.number(name!("output_tokens"), usage.output);
            }
        });
    }

    /// Writes the line of a request the gateway answered `status` itself, with the reason
    /// (never a key or a body).
    pub(crate) fn write_refused(&self, status: u16, reason: &str) {
        line::write(|fields| {
            fields.bare(name!("method"), self.method.as_str());
            fields.bare(name!("route"), &self.route);
            fields.number(name!("status"), u64::from(status));
            fields.millis(name!("duration_ms"), self.start.elapsed());
            fields.word(name!("outcome"), b"gateway_error");
            if let Some(name) = &self.key_name {
                fields.quoted(name!("key"), name);
            }
            self.write_attempts(fields);
            fields.quoted(name!("reason"), reason);
        });
    }

    /// Where a request that could have gone elsewhere went, and in how many attempts.
    fn write_attempts(&self, fields: &mut line::Fields) {
        if self.attempts == 0 {
            return;
        }
        if let Some(target) = &self.target {
            fields.quoted(name!("target"), target);
        }
        fields.number(name!("attempts"), u64::from(self.attempts));
    }
}
