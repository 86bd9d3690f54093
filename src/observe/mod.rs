//! Observability: Prometheus metrics, the token usage tap, the request log line, and
//! OpenTelemetry traces.
//!
//! Nothing here decides anything about a request; the pipeline reports to it. Every label and
//! field is bounded and free of keys, header values and bodies.

pub(crate) mod key;
pub(crate) mod log;
pub(crate) mod method;
pub(crate) mod metrics;
pub(crate) mod traces;
pub(crate) mod usage;
