//! The request's span, when traces are on (`tracing.otlp_endpoint`): opened as the request
//! goes upstream, named by the GenAI conventions on usage routes, ended with the answer.

use http::{HeaderMap, Method};

use super::{model, Mount};
use crate::config::Config;
use crate::observe::log::Record;
use crate::observe::traces::{self, GenAi, RequestSpan, UpstreamSpan};
use crate::routes::RouteSpec;

/// The spans of a pipeline: present when traces are on. What a span says about the
/// upstream (`gen_ai.provider.name`, `server.address`) is its mount's.
pub(super) struct Traced;

impl Traced {
    /// `None` when traces are off: then no span is ever made.
    pub(super) fn new(config: &Config) -> Option<Traced> {
        config.tracing.traces_on().then_some(Traced)
    }

    /// The span of the request `record` opened, by `route`, with its whole JSON `body` when
    /// the engine or the pipeline read it whole (to name the model).
    pub(super) fn open(
        &self,
        record: &Record,
        route: &RouteSpec,
        provider: &'static str,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> RequestSpan {
        let model = body.and_then(model::in_json);
        let template = &record.route;
        let gen_ai = route.usage.then(|| GenAi {
            operation: traces::operation(template, route.operation_id.as_deref()),
            provider,
            model: model.as_deref(),
        });
        RequestSpan::start(&record.method, template, headers, gen_ai)
    }

    /// The span of the wait for `mount`'s head, inside `span`.
    pub(super) fn upstream_wait(
        &self,
        span: &RequestSpan,
        method: &Method,
        mount: &Mount,
    ) -> UpstreamSpan {
        span.upstream_wait(method, mount.server())
    }
}
