//! Observability: Prometheus metrics, the token usage tap, the request log line, and
//! OpenTelemetry traces.
//!
//! Nothing here decides anything about a request; the pipeline reports to it. Every label and
//! field is bounded and free of keys, header values and bodies.

pub mod log;
pub mod metrics;
pub mod traces;
pub mod usage;
