//! Phases 5–8: an admitted request goes upstream and its answer comes back through the log
//! line, metrics and usage tap; or, on a WebSocket route, a session opens.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::combinators::BoxBody;
use tokio::time::Instant;

use super::admit::{Admitted, Endpoint, MethodRoute};
use super::body::{self, Upload, UploadBody, UploadProgress};
use super::keys::KeyPool;
use super::relay::{Opening, Relay, RequestLog};
use super::stream_usage::{self, UsageChunkFilter};
use super::timer::{self, Timer};
use super::{answer, outbound, Answer, AnswerBody, GatewayError, Mount, Pipeline};
use crate::headers::Media;
use crate::realtime::{self, ClientUpgrade, Session};
use crate::routes::BodyKind;
use crate::upstream::{self, Head, OutboundBody};

/// Why a request got no answer head.
enum Unanswered {
    /// The upstream was silent past the read timeout.
    Silent,
    Failed(upstream::SendError),
}

/// The client's body, in the form its engine reads it.
pub(crate) enum ClientBody {
    /// All of it, read before sending (possibly empty).
    Whole(Bytes),
    /// As it arrives.
    Stream(BoxBody<Bytes, std::io::Error>),
}

impl<'a> Admitted<'a> {
    /// The longest silence allowed inside the body (`server.body_read_timeout`).
    pub(crate) fn body_idle(&self) -> Duration {
        self.endpoint.pipeline.bodies.idle
    }

    /// The answer when the client stalled mid-body while its engine read it whole.
    pub(crate) fn body_stalled(self) -> Answer {
        let err = GatewayError::ClientBodyTimeout {
            timeout: self.body_idle(),
        };
        self.endpoint.reject(&self.method, self.start, &err)
    }

    /// Phases 5–8: the upstream request, sending it, the answer's head, and the body on its
    /// way back through the log line, metrics and usage tap. `upgrade` is the client's side
    /// of a WebSocket, when its engine can switch protocols.
    ///
    /// One future from here to the answer, with `self` taken apart in place: each nested
    /// `async fn` would keep its own copy of what it was given for as long as the request
    /// waits.
    #[allow(clippy::manual_async_fn)] // An `async fn` holds its arguments twice; see below.
    pub(crate) fn forward<'t, 's>(
        mut self,
        body: ClientBody,
        upgrade: Option<ClientUpgrade>,
        mut timer: Option<&'t mut Timer<'s>>,
    ) -> impl Future<Output = Answer> + Send + use<'a, 't, 's> {
        // A block rather than an `async fn`: one of those keeps each argument twice (as given,
        // and moved into its body), and this future waits for every forwarded request.
        async move {
            let (endpoint, route, start) = (self.endpoint, self.route, self.start);
            // 3, with `limits.store`: the shared limits, one round trip. Boxed: only then
            // does a request wait here.
            if self.admission.is_pending() {
                let limiter = &endpoint.pipeline.limiter;
                if let Err(err) = Box::pin(limiter.settle(&mut self.admission)).await {
                    return endpoint.reject(&self.method, start, &err);
                }
            }
            if route.spec.accepts(BodyKind::WebSocket) {
                let method = self.method.clone();
                // Why boxed: a handshake's future is far larger than a forwarded request's, and
                // would size every one.
                return match Box::pin(self.open_session(upgrade)).await {
                    Ok(answer) => {
                        endpoint.answered(route, start, &answer);
                        answer
                    }
                    Err(err) => endpoint.failed(route, &method, start, &err),
                };
            }
            let pipeline = &*endpoint.pipeline;
            let mount = &*route.mount;
            // `[usage] inject_stream_usage`: such a body is read whole, to be rewritten; with
            // traces on, a usage route's JSON too, to name its model.
            let asks_usage = pipeline.inject_stream_usage && route.spec.stream_usage_option;
            let reads_whole = asks_usage
                || (pipeline.traces.is_some()
                    && route.spec.usage
                    && body::sends_json(&self.headers));
            let (mut body, upload) = match body {
                ClientBody::Whole(body) => {
                    let bytes = body.len() as u64;
                    (OutboundBody::Whole(body), Upload::Whole(bytes))
                }
                ClientBody::Stream(body) => {
                    let progress = UploadProgress::starting_at(start);
                    let chunks = http_body_util::BodyDataStream::new(body);
                    let counted = UploadBody::new(
                        chunks,
                        self.limit.value,
                        pipeline.bodies.idle,
                        Arc::clone(&progress),
                    );
                    let body = if reads_whole {
                        // Boxed: only this path holds the read.
                        match Box::pin(body::read_whole(counted)).await {
                            Ok(whole) => OutboundBody::Whole(whole),
                            Err(err) => {
                                let idle = pipeline.bodies.idle;
                                let err = answer::upload_failed(&progress, self.limit, idle, err);
                                return endpoint.failed(route, &self.method, start, &err);
                            }
                        }
                    } else {
                        OutboundBody::Stream(upstream::streaming(counted))
                    };
                    (body, Upload::Streaming(progress))
                }
            };
            // 5. The upstream request, and its span when traces are on.
            let mut headers = std::mem::take(&mut self.headers);
            let trace = pipeline.traces.as_ref().map(|traced| {
                let whole = match &body {
                    OutboundBody::Whole(whole) => Some(&whole[..]),
                    OutboundBody::Stream(_) => None,
                };
                traced.open(
                    &self.method,
                    &endpoint.template,
                    &route.spec,
                    mount.provider,
                    &headers,
                    whole,
                )
            });
            // Within the body limit still, or the body goes up as it came.
            let asked = match &body {
                OutboundBody::Whole(whole) if asks_usage => stream_usage::ask_for_usage(whole)
                    .filter(|asked| asked.len() as u64 <= self.limit.value),
                _ => None,
            };
            let asked_for_usage = asked.is_some();
            if let Some(asked) = asked {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(asked.len()));
                body = OutboundBody::Whole(asked);
            }
            // The key the gateway lends, when it holds the mount's keys.
            let lent = mount.keys.as_ref().and_then(|pool| pool.pick());
            let target = (&self.target, endpoint.strip);
            let request =
                match outbound::request(mount, lent, self.method.clone(), target, headers, body) {
                    Ok(request) => request,
                    Err(err) => {
                        if let Some(trace) = trace {
                            trace.finish(err.status().as_u16(), None, "failed");
                        }
                        return endpoint.failed(route, &self.method, start, &err);
                    }
                };
            // 6. Send, and wait for the answer's head while the request shows life: the wait
            // restarts with every uploaded chunk, so a long upload is never cut, only silence is.
            let read_timeout = Pipeline::read_timeout(&route.spec, mount);
            let in_flight = route.metrics.all().in_flight();
            let waiting = (pipeline.traces.as_ref())
                .zip(trace.as_ref())
                .map(|(traced, span)| traced.upstream_wait(span, &self.method, mount));
            let sent = Instant::now();
            // Pinned where they are made (`std::pin::pin!`): `tokio::pin!` would move each into a
            // second local, and this future would hold both.
            let mut sending = std::pin::pin!(mount.upstream.send(request));
            let mut own = std::pin::pin!(None::<tokio::time::Sleep>);
            let response = loop {
                let deadline = upload.last_activity(start) + read_timeout;
                tokio::select! {
                    biased;
                    result = sending.as_mut() => break result.map_err(Unanswered::Failed),
                    () = timer::until(&mut timer, own.as_mut(), deadline) => {
                        if upload.last_activity(start) + read_timeout <= Instant::now() {
                            break Err(Unanswered::Silent);
                        }
                    }
                }
            };
            // 7. The answer's head, or who failed.
            let mut response = match response {
                Ok(response) => {
                    if let Some(waiting) = waiting {
                        waiting.answered(response.status.as_u16());
                    }
                    response
                }
                Err(unanswered) => {
                    if let Some(waiting) = waiting {
                        waiting.failed(match unanswered {
                            Unanswered::Silent => "timeout",
                            Unanswered::Failed(_) => "upstream_error",
                        });
                    }
                    let err = match unanswered {
                        Unanswered::Silent => GatewayError::UpstreamTimeout {
                            setting: Pipeline::read_timeout_setting(&route.spec, mount),
                            timeout: read_timeout,
                        },
                        Unanswered::Failed(err) => {
                            let timeouts = answer::Timeouts {
                                at: Arc::clone(&mount.at),
                                connect: mount.upstream.connect_timeout(),
                                body_idle: pipeline.bodies.idle,
                            };
                            answer::classify(err, upload.progress(), self.limit, &timeouts)
                        }
                    };
                    if let Some(trace) = trace {
                        trace.finish(err.status().as_u16(), None, "failed");
                    }
                    return endpoint.failed(route, &self.method, start, &err);
                }
            };
            let upstream_ttfb = sent.elapsed();
            route.metrics.observe_upstream_ttfb(upstream_ttfb);
            let upstream_key = mount.keys.as_deref().zip(lent).and_then(|(pool, index)| {
                endpoint.key_answered(mount, pool, index, response.status, &response.head)
            });
            let media = answer::head_rules(&mut response.head);
            if pipeline.server_timing {
                answer::server_timing(&mut response.head, start.elapsed(), upstream_ttfb);
            }
            // 8. The log line, metrics and usage tap, as the body streams back.
            let opening = Opening {
                method: self.method,
                route: Arc::clone(&endpoint.template),
                metrics: Arc::clone(&route.metrics),
                key: self.key,
                start,
                admission: self.admission,
                upload,
                upstream_ttfb,
                in_flight,
                usage: route.spec.usage,
                trace,
                mount: mount.log_name(),
                upstream_key,
            };
            let log = RequestLog::open(opening, response.status, &response.head, media);
            let is_event_stream = media == Media::EventStream;
            // A compressed stream cannot be read for its events: it goes on whole.
            let encoded = (response.head.get(&header::CONTENT_ENCODING))
                .is_some_and(|coding| !coding.eq_ignore_ascii_case(b"identity"));
            let usage_chunk =
                (asked_for_usage && is_event_stream && !encoded).then(UsageChunkFilter::default);
            if usage_chunk.is_some() {
                // Some of the body stays back: the upstream's length is not the client's.
                answer::undeclare_length(&mut response.head);
            }
            let keepalive = is_event_stream
                .then(|| pipeline.keepalive(&route.spec))
                .flatten();
            let answer = Answer {
                status: response.status,
                head: response.head,
                body: AnswerBody::Relay(Box::new(Relay::new(
                    response.body,
                    read_timeout,
                    keepalive,
                    usage_chunk,
                    log,
                ))),
            };
            endpoint.answered(route, start, &answer);
            answer
        }
    }

    /// Phases 5–8 for a WebSocket route: the session opens upstream first, so a refusal
    /// reaches the client as the upstream's own answer.
    async fn open_session(self, upgrade: Option<ClientUpgrade>) -> Result<Answer, GatewayError> {
        let client_key =
            realtime::client_key(&self.headers).map_err(GatewayError::NotAWebSocket)?;
        let upgrade = upgrade.ok_or_else(|| {
            GatewayError::Internal(
                "this connection cannot switch to a WebSocket (it needs HTTP/1.1)".to_owned(),
            )
        })?;
        let pipeline = &*self.endpoint.pipeline;
        let mount = &*self.route.mount;
        let joined = outbound::path(mount.upstream.target(), &self.target, self.endpoint.strip)?;
        let session = Session {
            route: Arc::clone(&self.endpoint.template),
            metrics: Arc::clone(&self.route.metrics),
            key_hash: (*self.key.prefix()).to_owned(),
            start: self.start,
            held: self.admission,
        };
        let mut headers = outbound::headers(self.headers, None);
        if let Some(pool) = &mount.keys {
            if let Some(index) = pool.pick() {
                pool.lend(index, &mut headers);
                if let Some(var) = pool.var(index) {
                    self.route.metrics.all().count_key_use(&mount.name, var);
                }
            }
        }
        let opened = pipeline
            .realtime
            .open(
                &mount.upstream,
                joined,
                headers,
                &client_key,
                upgrade,
                session,
            )
            .await;
        match opened {
            Ok(realtime::Opened::Switching(headers)) => Ok(Answer {
                status: StatusCode::SWITCHING_PROTOCOLS,
                head: Head::Map(headers),
                body: AnswerBody::Full(Bytes::new()),
            }),
            Ok(realtime::Opened::Refused(refusal)) => {
                let (parts, body) = refusal.into_parts();
                let mut head = Head::Map(parts.headers);
                answer::strip_connection_headers(&mut head);
                Ok(Answer {
                    status: parts.status,
                    head,
                    body: AnswerBody::Full(body),
                })
            }
            Err(realtime::Failed::TimedOut(timeout)) => Err(GatewayError::UpstreamConnectTimeout {
                at: Arc::clone(&mount.at),
                timeout,
            }),
            Err(realtime::Failed::Unreachable(err)) => Err(GatewayError::UpstreamUnreachable(err)),
        }
    }
}

impl Endpoint {
    /// The answer's head came back to a request that went up with the held key `index`:
    /// counted under its variable, and a 429 rests the key as long as the head says.
    /// The variable's name, for the log line.
    fn key_answered(
        &self,
        mount: &Mount,
        pool: &KeyPool,
        index: usize,
        status: StatusCode,
        head: &Head,
    ) -> Option<Arc<str>> {
        let var = pool.var(index)?;
        let metrics = &self.pipeline.metrics;
        metrics.count_key_use(&mount.name, var);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let rest = pool.rest(index, |name| {
                HeaderName::from_bytes(name.as_bytes())
                    .ok()
                    .and_then(|name| head.get(&name))
            });
            metrics.count_key_rest(&mount.name, var);
            tracing::warn!(
                mount = %mount.name,
                upstream_key = %var,
                rest_ms = u64::try_from(rest.as_millis()).unwrap_or(u64::MAX),
                "the upstream answered 429; this key rests while the others serve"
            );
        }
        Some(Arc::clone(var))
    }

    /// Counts an answer to a request of `route`.
    fn answered(&self, route: &MethodRoute, start: Instant, answer: &Answer) {
        route.metrics.count_status(answer.status.as_u16());
        route.metrics.observe_response_headers(start.elapsed());
    }

    /// The answer to a request of `route` that failed after admission, counted as the
    /// upstream's failure when it was one.
    fn failed(
        &self,
        route: &MethodRoute,
        method: &Method,
        start: Instant,
        err: &GatewayError,
    ) -> Answer {
        if let Some(kind) = answer::upstream_error_kind(err) {
            route.metrics.count_upstream_error(kind);
        }
        let answer = self.reject(method, start, err);
        route.metrics.count_mount_status(answer.status.as_u16());
        answer
    }
}
