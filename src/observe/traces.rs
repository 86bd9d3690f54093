//! OpenTelemetry traces, opt-in (`tracing.otlp_endpoint`, or the standard `OTEL_EXPORTER_OTLP_*`
//! variables): one server span per forwarded request, with a client span for each wait for an
//! upstream's head, exported over OTLP/HTTP by a batch processor on its own thread.
//!
//! Spans are made with the OpenTelemetry API directly, not through `tracing`: a `tracing`
//! span fed to the OpenTelemetry layer costs its registry entry, the layer's bookkeeping and a
//! subscriber lookup for every attribute, about 5 µs a request here (performance.md, "Traces
//! on the OpenTelemetry API"). A span the sampler drops records nothing further.
//!
//! Attributes follow the HTTP server conventions and, on usage routes, the GenAI ones
//! (semantic conventions v1.41.0, GenAI in development status). No header value, path,
//! prompt or completion is ever recorded: the route template stands for the path, as in the
//! request log. With traces off the pipeline creates no span at all.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

use super::method::method_label;
use super::usage::Usage;
use crate::config::TracingConfig;

/// The tracer of the exporter made at start-up ([`exporter`]); unset while traces are off,
/// and then every span is a no-op.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The exporter's side: flushed and stopped by [`Exporting::shutdown`] on exit.
pub struct Exporting {
    provider: SdkTracerProvider,
}

impl Exporting {
    /// Sends what is still queued (within the exporter's timeout) and stops.
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(error = %err, "OpenTelemetry spans could not all be sent on exit");
        }
    }
}

/// The exporter, when traces are on; the spans of the whole process go to it from here on.
pub(crate) fn exporter(config: &TracingConfig) -> Result<Option<Exporting>, String> {
    if !config.traces_on() {
        return Ok(None);
    }
    // The exporter's HTTPS client uses the process's rustls provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(base) = &config.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        builder =
            builder.with_endpoint(format!("{}/v1/traces", base.as_str().trim_end_matches('/')));
    }
    let exporter = builder
        .build()
        .map_err(|err| format!("cannot set up the OTLP exporter: {err}"))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("oa-bypass");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(WarnOnFailure::new(exporter))
        .with_resource(resource.build())
        .build();
    // A second exporter (a second `init` in one process) keeps the first one's tracer.
    let _ = TRACER.set(provider.tracer("oa-bypass"));
    Ok(Some(Exporting { provider }))
}

/// Passes batches to the OTLP exporter and says when they fail, once a minute at most: a
/// collector that does not answer must not flood the log, and its spans are dropped.
#[derive(Debug)]
struct WarnOnFailure<E> {
    inner: E,
    failed: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

const WARN_EVERY: Duration = Duration::from_secs(60);

impl<E> WarnOnFailure<E> {
    fn new(inner: E) -> Self {
        WarnOnFailure {
            inner,
            failed: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        }
    }

    fn failed(&self, err: &dyn std::fmt::Display) {
        let failed = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(mut last) = self.last_warning.lock() else {
            return;
        };
        if last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        self.failed.store(0, Ordering::Relaxed);
        tracing::warn!(
            error = %err,
            failed_batches = failed,
            "OpenTelemetry spans dropped: the OTLP endpoint did not take them \
             (tracing.otlp_endpoint; warned once a minute)"
        );
    }
}

impl<E: SpanExporter> SpanExporter for WarnOnFailure<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        if let Err(err) = &result {
            self.failed(err);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// What a usage route's span says about the model call, known before it is sent.
pub(crate) struct GenAi<'a> {
    /// `gen_ai.operation.name`.
    pub operation: Cow<'static, str>,
    /// `gen_ai.provider.name`.
    pub provider: &'static str,
    /// `gen_ai.request.model`, when the request names one.
    pub model: Option<&'a str>,
}

/// The `gen_ai.operation.name` of a usage route: the convention's names for the APIs that
/// have one, else the route's operation ID.
pub(crate) fn operation(template: &str, operation_id: Option<&str>) -> Cow<'static, str> {
    match template {
        "/v1/chat/completions" | "/v1/responses" => Cow::Borrowed("chat"),
        "/v1/completions" => Cow::Borrowed("text_completion"),
        "/v1/embeddings" => Cow::Borrowed("embeddings"),
        _ => Cow::Owned(operation_id.unwrap_or(template).to_owned()),
    }
}

/// `gen_ai.provider.name` for an upstream host: the convention's names for the providers it
/// knows, `openai` for the rest (they speak its API).
pub(crate) fn provider(host: &str) -> &'static str {
    let host = host.to_ascii_lowercase();
    let known = [
        (".openai.azure.com", "azure.ai.openai"),
        ("api.groq.com", "groq"),
        ("api.deepseek.com", "deepseek"),
        ("api.mistral.ai", "mistral_ai"),
        ("api.x.ai", "x_ai"),
        ("api.perplexity.ai", "perplexity"),
        ("api.anthropic.com", "anthropic"),
        ("generativelanguage.googleapis.com", "gcp.gemini"),
        ("openrouter.ai", "openrouter"),
    ];
    known
        .iter()
        .find(|(suffix, _)| host.ends_with(suffix))
        .map_or("openai", |(_, name)| name)
}

/// The span of one forwarded request, from the upstream request to the answer's last byte.
/// It ends when finished, or when dropped.
pub(crate) struct RequestSpan {
    /// The client's trace with this span in it: what the upstream waits are children of.
    cx: Context,
    started: Instant,
    first_chunk: bool,
}

impl std::fmt::Debug for RequestSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let span = self.cx.span();
        f.debug_struct("RequestSpan")
            .field("span_id", &span.span_context().span_id())
            .finish_non_exhaustive()
    }
}

impl RequestSpan {
    /// Opens the span of a `method` request to `route`, continuing the client's W3C trace
    /// (`traceparent`, `tracestate`) when it sent one.
    pub(crate) fn start(
        method: &Method,
        route: &Arc<str>,
        headers: &HeaderMap,
        gen_ai: Option<GenAi<'_>>,
    ) -> RequestSpan {
        let parent =
            TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
        let Some(tracer) = TRACER.get() else {
            return RequestSpan {
                cx: parent,
                started: Instant::now(),
                first_chunk: false,
            };
        };
        let name = match &gen_ai {
            Some(GenAi {
                operation,
                model: Some(model),
                ..
            }) => format!("{operation} {model}"),
            Some(GenAi { operation, .. }) => operation.to_string(),
            None => format!("{method} {route}"),
        };
        let mut attributes = Vec::with_capacity(5);
        attributes.push(KeyValue::new("http.request.method", method_label(method)));
        attributes.push(KeyValue::new("http.route", Arc::clone(route)));
        if let Some(gen_ai) = gen_ai {
            attributes.push(KeyValue::new("gen_ai.operation.name", gen_ai.operation));
            attributes.push(KeyValue::new("gen_ai.provider.name", gen_ai.provider));
            if let Some(model) = gen_ai.model {
                attributes.push(KeyValue::new("gen_ai.request.model", model.to_owned()));
            }
        }
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        RequestSpan {
            cx: parent.with_span(span),
            started: Instant::now(),
            first_chunk: false,
        }
    }

    /// Whether the span records anything: traces are on and the sampler kept it.
    fn recording(&self) -> bool {
        self.cx.span().is_recording()
    }

    /// The span of the wait for an upstream's head: it ends when dropped.
    pub(crate) fn upstream_wait(&self, method: &Method, server: Option<&str>) -> UpstreamSpan {
        let tracer = TRACER.get().filter(|_| self.recording());
        UpstreamSpan(tracer.map(|tracer| {
            let method = method_label(method);
            let mut attributes = vec![KeyValue::new("http.request.method", method)];
            if let Some(server) = server {
                attributes.push(KeyValue::new("server.address", server.to_owned()));
            }
            let span = tracer
                .span_builder(method)
                .with_kind(SpanKind::Client)
                .with_attributes(attributes)
                .start_with_context(tracer, &self.cx);
            Box::new(span)
        }))
    }

    /// Marks the answer's first body chunk, once.
    pub(crate) fn saw_chunk(&mut self) {
        if !std::mem::replace(&mut self.first_chunk, true) && self.recording() {
            let after = self.started.elapsed().as_secs_f64();
            let span = self.cx.span();
            span.set_attribute(KeyValue::new("gen_ai.response.time_to_first_chunk", after));
            span.add_event("first chunk", Vec::new());
        }
    }

    /// Ends the span of an answer with `status`: the usage read from it, and whether it
    /// reached the client whole (`outcome`).
    pub(crate) fn finish(self, status: u16, usage: Option<&Usage>, outcome: &str) {
        if !self.recording() {
            return;
        }
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(usage) = usage {
            span.set_attributes(usage_attributes(usage));
        }
        if status >= 500 || outcome != "complete" {
            let error = if status >= 500 {
                status.to_string()
            } else {
                outcome.to_owned()
            };
            span.set_attribute(KeyValue::new("error.type", error.clone()));
            span.set_status(Status::error(error));
        }
        span.end();
    }
}

/// The GenAI attributes of an answer's usage.
fn usage_attributes(usage: &Usage) -> Vec<KeyValue> {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let mut attributes = Vec::with_capacity(5);
    if let Some(model) = &usage.model {
        attributes.push(KeyValue::new("gen_ai.response.model", model.clone()));
    }
    attributes.push(KeyValue::new(
        "gen_ai.usage.input_tokens",
        count(usage.input),
    ));
    attributes.push(KeyValue::new(
        "gen_ai.usage.output_tokens",
        count(usage.output),
    ));
    if usage.cached_input > 0 {
        let cached = count(usage.cached_input);
        attributes.push(KeyValue::new(
            "gen_ai.usage.cache_read.input_tokens",
            cached,
        ));
    }
    if usage.reasoning > 0 {
        let reasoning = count(usage.reasoning);
        attributes.push(KeyValue::new(
            "gen_ai.usage.reasoning.output_tokens",
            reasoning,
        ));
    }
    attributes
}

/// The client span of a wait for an upstream's head (`None`: not recorded). Boxed: every
/// forwarded request's future holds this across its wait, and a span is large.
pub(crate) struct UpstreamSpan(Option<Box<Span>>);

impl UpstreamSpan {
    /// The upstream answered with `status`; the span ends here.
    pub(crate) fn answered(self, status: u16) {
        let Some(mut span) = self.0 else { return };
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            span.set_attribute(KeyValue::new("error.type", status.to_string()));
            span.set_status(Status::error(status.to_string()));
        }
    }

    /// No answer came (`why`: the error's kind); the span ends here.
    pub(crate) fn failed(self, why: &'static str) {
        let Some(mut span) = self.0 else { return };
        span.set_attribute(KeyValue::new("error.type", why));
        span.set_status(Status::error(why));
    }
}

#[cfg(test)]
mod tests {
    use super::provider;

    #[test]
    fn each_mounts_host_names_its_provider() {
        assert_eq!(provider("api.openai.com"), "openai");
        assert_eq!(provider("my-res.openai.azure.com"), "azure.ai.openai");
        assert_eq!(provider("api.anthropic.com"), "anthropic");
        assert_eq!(provider("generativelanguage.googleapis.com"), "gcp.gemini");
        assert_eq!(provider("API.GROQ.COM"), "groq");
    }
}
