//! Phases 5–8 of an admitted request, each a step of its own: the body in the form the
//! request needs ([`Admitted::take_body`]), the upstream request
//! ([`Admitted::upstream_request`]), the wait for the answer's head ([`Admitted::wait`]),
//! and the answer on its way back through the log line, metrics and usage tap
//! ([`Admitted::answer`]), or the failure ([`Admitted::fail`]). A WebSocket route opens a
//! session instead (`session.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderValue, StatusCode};
use http_body_util::BodyDataStream;
use tokio::time::Instant;

use super::admit::Admitted;
use super::aliases::AliasedList;
use super::body::{self, UploadBody, UploadProgress};
use super::mount::Mount;
use super::relay::{BodyEdit, Relay, RequestLog};
use super::stream_usage::{self, UsageChunkFilter};
use super::timer::{self, Timer};
use super::{answer, model, outbound, Answer, GatewayError, Pipeline};
use crate::headers::Media;
use crate::message::{Body, Chunks, RequestBody};
use crate::observe::usage::UsageTap;
use crate::realtime::ClientUpgrade;
use crate::routes::BodyKind;
use crate::upstream::{Outbound, Response, SendError};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A streamed request body, counted, cut at its limit and watched for silence.
type Counted = UploadBody<BodyDataStream<Chunks>>;

/// Why a request got no answer head.
enum Unanswered {
    /// The upstream was silent past the read timeout.
    Silent,
    Failed(SendError),
}

impl<'a> Admitted<'a> {
    /// The longest silence allowed inside the body (`server.body_read_timeout`).
    pub(crate) fn body_idle(&self) -> Duration {
        self.endpoint.pipeline.body_idle()
    }

    /// The answer when the client stalled mid-body while its engine read it whole.
    pub(crate) fn body_stalled(self) -> Answer {
        let err = GatewayError::ClientBodyTimeout {
            timeout: self.body_idle(),
        };
        self.endpoint.reject(&self.record, &err)
    }

    /// Phases 5–8: the upstream request, sending it, the answer's head, and the body on its
    /// way back through the log line, metrics and usage tap. `upgrade` is the client's side
    /// of a WebSocket, when its engine can switch protocols; `timer`, a sleep the engine
    /// lends the request's waits.
    ///
    /// A block rather than an `async fn`: one of those keeps each argument twice (as given,
    /// and moved into its body), and this future waits for every forwarded request. The
    /// steps that do not wait are plain functions, which do not grow it.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn forward<'t, 's>(
        mut self,
        body: RequestBody,
        upgrade: Option<ClientUpgrade>,
        mut timer: Option<&'t mut Timer<'s>>,
    ) -> impl Future<Output = Answer> + Send + use<'a, 't, 's> {
        async move {
            // 3, with `limits.store`: the shared limits and a named key's counts, one round
            // trip. Boxed: only then does a request wait here.
            if self.is_pending() {
                if let Err(err) = Box::pin(self.settle()).await {
                    return self.endpoint.reject(&self.record, &err);
                }
            }
            if self.route.spec.accepts(BodyKind::WebSocket) {
                // Boxed: a handshake's future is far larger than a forwarded request's, and
                // would size every one.
                return Box::pin(self.open_session(upgrade)).await;
            }
            let reads_whole = self.reads_whole();
            let boundary = self.scans_fields();
            let body = {
                let (body, model) = match (self.take_body(body), boundary) {
                    // Boxed: only this path holds the read.
                    (Body::Stream(counted), _) if reads_whole => {
                        match Box::pin(body::read_whole(counted)).await {
                            Ok(whole) => {
                                let model = self.model_in(&whole);
                                (Body::Whole(whole), model)
                            }
                            Err(err) => return self.upload_failed(err),
                        }
                    }
                    // 4, for a named key's model or `[models]`: a form's fields before its
                    // file. Boxed, as above.
                    (Body::Stream(counted), Some(boundary)) => {
                        match Box::pin(model::hold_fields(counted, &boundary)).await {
                            Ok(mut held) => {
                                let model = held.model.take();
                                self.rename_held(&mut held.held, &boundary, model.as_deref());
                                let named = model.map(|model| model::Named { model, at: None });
                                (held.into_body(), named)
                            }
                            Err(err) => return self.upload_failed(err),
                        }
                    }
                    (Body::Whole(whole), _) => {
                        let model = self.model_in(&whole);
                        (Body::Whole(whole), model)
                    }
                    (Body::Stream(counted), None) => (RequestBody::streaming(counted), None),
                };
                // 4, for a named key's model.
                if let Err(err) = self.check_model(model.as_ref().map(model::Named::as_str)) {
                    return self.endpoint.reject(&self.record, &err);
                }
                // Phases 5–8 by `[models]` and `[retry]`. Boxed: only a request that may go
                // elsewhere holds the attempts' state.
                if self.may_go_elsewhere(model.as_ref().map(model::Named::as_str)) {
                    return Box::pin(self.forward_with_failover(body, model, timer)).await;
                }
                body
            };
            // 5. The upstream request.
            let mount = &*self.route.mount;
            let request = match self.upstream_request(body, mount) {
                Ok(request) => request,
                Err(err) => return self.fail(err),
            };
            // 6. Send, and wait for the answer's head. Pinned where it is made: moved into
            // the wait, it would be held twice.
            let sending = std::pin::pin!(mount.upstream.send(request));
            match self.wait(sending, mount, &mut timer).await {
                // 7 and 8.
                Ok(response) => self.answer(response, mount),
                Err(err) => self.fail(err),
            }
        }
    }

    /// Whether the body is read whole before it goes up: with `usage.inject_stream_usage` on
    /// a `stream_usage_option` route (to edit it), with traces on a usage route's JSON (to
    /// name its model), for a key with `models` or a route `[models]` routes, JSON (to read
    /// its model), and for `retry = true`, a body small enough to send again.
    fn reads_whole(&self) -> bool {
        let pipeline = &*self.endpoint.pipeline;
        let json = || body::sends_json(&self.headers);
        self.asks_usage()
            || (pipeline.traces.is_some() && self.route.spec.usage && json())
            || ((self.governs_model() || self.route.routes_by_model) && json())
            || (self.route.mount.settings.retry && self.fits_retry())
    }

    /// Whether the gateway asks a stream on this route for its usage.
    /// With `usage.inject_stream_usage`, or for a key whose rates or budgets count tokens.
    fn asks_usage(&self) -> bool {
        (self.endpoint.pipeline.config.usage.inject_stream_usage || self.metered())
            && self.route.spec.stream_usage_option
    }

    /// The body in the form the steps after admission take it: a streamed one counted, cut
    /// at the limit and watched for silence. The request is in flight from here.
    fn take_body(&mut self, body: RequestBody) -> Body<Counted> {
        self.asked_for_usage = self.asks_usage();
        self.in_flight = Some(self.route.metrics.gateway().in_flight());
        match body {
            Body::Whole(body) => {
                self.record.bytes_in = body.len() as u64;
                Body::Whole(body)
            }
            Body::Stream(chunks) => {
                let progress = UploadProgress::starting_at(self.record.start);
                let idle = self.endpoint.pipeline.body_idle();
                let chunks = BodyDataStream::new(chunks);
                let counted =
                    UploadBody::new(chunks, self.limit.value, idle, Arc::clone(&progress));
                self.upload = Some(progress);
                Body::Stream(counted)
            }
        }
    }

    fn pipeline(&self) -> &Pipeline {
        &self.endpoint.pipeline
    }

    /// Phase 5: the request the upstream gets, and its span when traces are on. With
    /// `usage.inject_stream_usage`, a stream that did not ask for its usage is asked for it
    /// (within the body limit still, or the body goes up as it came).
    pub(super) fn upstream_request(
        &mut self,
        mut body: RequestBody,
        mount: &Mount,
    ) -> Result<Outbound, GatewayError> {
        let mut headers = std::mem::take(&mut self.headers);
        let target = std::mem::replace(&mut self.target, PathAndQuery::from_static("/"));
        let whole = match &body {
            Body::Whole(whole) => Some(&whole[..]),
            Body::Stream(_) => None,
        };
        // A request's span opens with its first attempt; each attempt has a client span.
        if self.trace.is_none() {
            self.trace = self.pipeline().traces.as_ref().map(|traced| {
                let route = &self.route.spec;
                Box::new(traced.open(&self.record, route, mount.provider, &headers, whole))
            });
        }
        let asked = (self.asked_for_usage)
            .then_some(whole)
            .flatten()
            .and_then(stream_usage::ask_for_usage)
            .filter(|asked| asked.len() as u64 <= self.limit.value);
        self.asked_for_usage = asked.is_some();
        if let Some(asked) = asked {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(asked.len()));
            body = Body::Whole(asked);
        }
        let metrics = &self.pipeline().metrics;
        let method = self.record.method.clone();
        let target = (&target, self.endpoint.prefix_len);
        let (request, lent) = outbound::request(mount, metrics, method, target, headers, body)?;
        self.lent = lent;
        self.record.upstream_key = lent.and_then(|lent| mount.lent_var(lent));
        Ok(request)
    }

    /// When the request last showed any life: its start, or its latest uploaded chunk.
    fn last_activity(&self) -> Instant {
        (self.upload.as_ref()).map_or(self.record.start, |upload| upload.last_activity())
    }

    /// Phase 6: waits for the answer's head while the request shows life: the wait restarts
    /// with every uploaded chunk, so a long upload is never cut, only silence is (504).
    pub(super) async fn wait(
        &mut self,
        mut sending: Pin<&mut impl Future<Output = Result<Response, SendError>>>,
        mount: &Mount,
        timer: &mut Option<&mut Timer<'_>>,
    ) -> Result<Response, GatewayError> {
        let route = &self.route.spec;
        let read_timeout = Pipeline::read_timeout(route, mount);
        let waiting = (self.pipeline().traces.as_ref())
            .zip(self.trace.as_ref())
            .map(|(traced, span)| traced.upstream_wait(span, &self.record.method, mount));
        let sent = Instant::now();
        // Pinned where it is made (`std::pin::pin!`): `tokio::pin!` would move it into a
        // second local, and this future would hold both.
        let mut own = std::pin::pin!(None::<tokio::time::Sleep>);
        let response = loop {
            let deadline = self.last_activity() + read_timeout;
            tokio::select! {
                biased;
                result = sending.as_mut() => break result.map_err(Unanswered::Failed),
                () = timer::until(timer, own.as_mut(), deadline) => {
                    if self.last_activity() + read_timeout <= Instant::now() {
                        break Err(Unanswered::Silent);
                    }
                }
            }
        };
        if let Some(waiting) = waiting {
            match &response {
                Ok(response) => waiting.answered(response.status.as_u16()),
                Err(Unanswered::Silent) => waiting.failed("timeout"),
                Err(Unanswered::Failed(_)) => waiting.failed("upstream_error"),
            }
        }
        match response {
            Ok(response) => {
                self.record.upstream_ttfb = sent.elapsed();
                (self.route.metrics).observe_upstream_ttfb(self.record.upstream_ttfb);
                Ok(response)
            }
            Err(unanswered) => Err(self.who_failed(unanswered, mount, read_timeout)),
        }
    }

    /// Phase 7 for a request whose head never came: who failed. The client, when its upload
    /// went wrong; else the upstream, silent (504) or failing (502).
    fn who_failed(
        &self,
        unanswered: Unanswered,
        mount: &Mount,
        read_timeout: Duration,
    ) -> GatewayError {
        let route = &self.route.spec;
        match unanswered {
            Unanswered::Silent => GatewayError::UpstreamTimeout {
                setting: Pipeline::read_timeout_setting(route, mount),
                timeout: read_timeout,
            },
            Unanswered::Failed(err) => answer::classify(
                err,
                self.upload.as_deref(),
                self.limit,
                self.pipeline().body_idle(),
                &mount.settings,
            ),
        }
    }

    /// The answer when the client's upload failed while the gateway read it whole.
    fn upload_failed(self, err: std::io::Error) -> Answer {
        let Some(upload) = self.upload.as_deref() else {
            return self.fail(GatewayError::ClientBody(err));
        };
        let idle = self.pipeline().body_idle();
        let err = answer::upload_failed(upload, self.limit, idle, err);
        self.fail(err)
    }

    /// The answer to a request that failed after admission: its span finished, counted as
    /// the upstream's failure when it was one, and its line written.
    pub(super) fn fail(self, err: GatewayError) -> Answer {
        if let Some(trace) = self.trace {
            trace.finish(err.status().as_u16(), None, "failed");
        }
        self.endpoint.failed(self.route, &self.record, &err)
    }

    /// Phases 7 and 8: the answer's head by its rules, and its body on its way back through
    /// the log line, metrics and usage tap.
    pub(super) fn answer(mut self, mut response: Response, mount: &Mount) -> Answer {
        let route = &self.route.spec;
        let pipeline = &*self.endpoint.pipeline;
        if let Some(lent) = self.lent {
            mount.key_answered(lent, response.status, &response.head, &pipeline.metrics);
        }
        let media = answer::head_rules(&mut response.head);
        if pipeline.config.tracing.server_timing {
            let until_head = self.record.start.elapsed();
            answer::server_timing(&mut response.head, until_head, self.record.upstream_ttfb);
        }
        self.record.status = response.status.as_u16();
        self.record.upstream_request_id = response.head.value(&X_REQUEST_ID);
        self.record.mount = mount.log_name();
        let is_event_stream = media == Media::EventStream;
        // A compressed stream cannot be read for its events: it goes on whole.
        let encoded = (response.head.get(&header::CONTENT_ENCODING))
            .is_some_and(|coding| !coding.eq_ignore_ascii_case(b"identity"));
        let edit = if self.asked_for_usage && is_event_stream && !encoded {
            Some(BodyEdit::UsageChunk(UsageChunkFilter::default()))
        } else if self.route.lists_aliases && response.status.is_success() && !encoded {
            let aliases = pipeline
                .config
                .models
                .aliases()
                .map(str::to_owned)
                .collect();
            Some(BodyEdit::Aliases(AliasedList::new(aliases)))
        } else {
            None
        };
        if edit.is_some() {
            // Some of the body stays back, or changes: the upstream's length is not the
            // client's.
            answer::undeclare_length(&mut response.head);
        }
        let keepalive = is_event_stream.then(|| pipeline.keepalive(route)).flatten();
        let read_timeout = Pipeline::read_timeout(route, mount);
        let (status, head, body) = (response.status, response.head, response.body);
        let (endpoint, route) = (self.endpoint, self.route);
        let log = self.into_log(status, media);
        endpoint.answered(route, &log.record, status);
        let relay = Relay::new(body, read_timeout, keepalive, edit, log);
        Answer {
            status,
            head,
            body: Body::Stream(Box::new(relay)),
        }
    }

    /// Phase 8's record of an answer with `status` and `media`: whether the usage tap reads
    /// it, and whether it holds a place among the open streams.
    fn into_log(mut self, status: StatusCode, media: Media) -> RequestLog {
        let usage_route = self.route.spec.usage;
        let usage =
            (usage_route && status.is_success() && media != Media::Other).then(UsageTap::new);
        let metrics = Arc::clone(&self.route.metrics);
        let stream_gauge = (media == Media::EventStream).then(|| metrics.gateway().open_stream());
        let metered = self.meter();
        RequestLog {
            metered,
            record: self.record,
            upload: self.upload,
            usage,
            metrics,
            trace: self.trace,
            _admission: self.admission,
            _gauges: (self.in_flight, stream_gauge),
        }
    }
}
