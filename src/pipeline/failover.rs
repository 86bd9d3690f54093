//! Phases 5–8 for a request that may go elsewhere when its upstream fails: `[models]` sends
//! it where the model it names is served (the model's bytes rewritten, nothing else), and
//! `[retry]` tries the next target, or the next held key, until an answer head other than a
//! 429 or a 5xx comes. All of it happens before the client has been sent a byte; once an
//! answer is taken, it streams as any other.
//!
//! Only a body the gateway holds whole (`retry.max_body`) can be sent twice; a streamed
//! upload goes to the first target alone. Retries draw on the budget
//! ([`super::health::RetryBudget`]), and a mount that keeps failing is left out of turn
//! ([`super::health::Health`]).

use std::ops::Range;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};

use super::admit::Admitted;
use super::model::{self, Named};
use super::mount::{Lent, Mount};
use super::timer::Timer;
use super::{Answer, GatewayError, Pipeline};
use crate::config::RetryConfig;
use crate::message::{Body, RequestBody};
use crate::observe::metrics::AttemptOutcome;
use crate::upstream::Response;

/// Where an attempt may go: a mount, and the model the upstream gets there when it is not
/// the client's.
struct Hop<'a> {
    mount: &'a Mount,
    served: Option<&'a str>,
}

/// How one attempt ended.
enum Attempt {
    /// A head another target would not better: it goes to the client.
    Answered(Response),
    /// 429, 500, 502, 503 or 504: another target, or key, may do better.
    Refused(Response),
    /// No connection, or none within `connect_timeout`: the request never left.
    Unreached(GatewayError),
    /// Anything else (the upload failed, the upstream went silent after taking the
    /// request): not retried, since the upstream may have acted on it.
    Failed(GatewayError),
}

/// The statuses another target may answer better: overloaded, rate-limited, or failing.
fn worth_retrying(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504)
}

impl<'a> Admitted<'a> {
    /// Phases 5–8 over the targets of the request's model (or its mount alone, with
    /// `retry = true`), each tried in turn until one answers.
    pub(super) async fn forward_with_failover(
        mut self,
        body: RequestBody,
        named: Option<Named>,
        mut timer: Option<&mut Timer<'_>>,
    ) -> Answer {
        let model = named.as_ref().map(Named::as_str);
        // Where a JSON body holds its model: renamed there without another pass.
        let model_at = named.as_ref().and_then(|named| named.at.clone());
        let endpoint = self.endpoint;
        let pipeline = &*endpoint.pipeline;
        let retry = &pipeline.config.retry;
        let hops = self.hops(model);
        let (whole, mut streamed) = match body {
            Body::Whole(whole) => (Some(whole), None),
            streamed @ Body::Stream(_) => (None, Some(streamed)),
        };
        let max_attempts = match &whole {
            Some(whole) if whole.len() as u64 <= retry.max_body => retry.max_attempts,
            _ => 1,
        };
        let headers = std::mem::take(&mut self.headers);
        let boundary = (model_at.is_none())
            .then(|| model::multipart_boundary(&headers))
            .flatten();
        let target = self.target.clone();
        let mut tried = Vec::new();
        let mut held: Option<(Response, &'a Mount)> = None;
        let mut at = first_in_turn(&hops, retry);
        pipeline.retry_budget.sent();
        for attempt in 1..=max_attempts {
            let hop = &hops[at];
            let body = match (&whole, streamed.take()) {
                (Some(whole), _) => Body::Whole(renamed(
                    whole,
                    hop.served,
                    model_at.clone(),
                    boundary.as_deref(),
                )),
                (None, Some(streamed)) => streamed,
                (None, None) => break,
            };
            self.headers = with_length(headers.clone(), &body);
            self.target = target.clone();
            let label = self.begin_attempt(hop, attempt, model);
            let name = &hop.mount.settings.mount;
            let mut rested = None;
            let (status, err) = match self.attempt(hop.mount, body, &mut timer).await {
                Attempt::Answered(response) => {
                    if hop.mount.health.answered() {
                        pipeline.metrics.set_ejected(name, false);
                    }
                    pipeline
                        .metrics
                        .count_attempt(name, AttemptOutcome::Answered);
                    return self.answer(response, hop.mount);
                }
                Attempt::Failed(err) => {
                    pipeline.metrics.count_attempt(name, AttemptOutcome::GaveUp);
                    return self.fail(err);
                }
                Attempt::Refused(response) => {
                    let status = response.status;
                    // A held key that drew a 429 rests now, so the next pick passes it by;
                    // the answer, if it goes to the client, does not rest it again. A 5xx
                    // is the mount's, not the key's: the next target takes it.
                    if let Some(lent) = self.lent.take() {
                        hop.mount
                            .key_answered(lent, status, &response.head, &pipeline.metrics);
                        rested = (status == StatusCode::TOO_MANY_REQUESTS).then_some(lent);
                    }
                    tried.push(format!("{label}: {}", status.as_u16()));
                    held = Some((response, hop.mount));
                    (Some(status), None)
                }
                Attempt::Unreached(err) => {
                    tried.push(format!("{label}: {err}"));
                    (None, Some(err))
                }
            };
            if status != Some(StatusCode::TOO_MANY_REQUESTS) && hop.mount.health.failed(retry) {
                pipeline.metrics.set_ejected(name, true);
            }
            let next = (attempt < max_attempts)
                .then(|| next_hop(&hops, at, rested, retry))
                .filter(|_| retry_fits(pipeline));
            let Some(next) = next else {
                pipeline.metrics.count_attempt(name, AttemptOutcome::GaveUp);
                return self.give_up(held, err, tried);
            };
            pipeline
                .metrics
                .count_attempt(name, AttemptOutcome::Retried);
            at = next;
        }
        self.fail(GatewayError::Internal(
            "the attempts ended without an answer".into(),
        ))
    }

    /// The record of attempt number `attempt` at `hop`, and what prices its answer; returns
    /// its label (`mount/model`).
    fn begin_attempt(&mut self, hop: &Hop<'_>, attempt: u32, model: Option<&str>) -> String {
        self.record.attempts = u8::try_from(attempt).unwrap_or(u8::MAX);
        let served = hop.served.or(model);
        let label = match served {
            Some(model) => format!("{}/{model}", hop.mount.settings.mount),
            None => hop.mount.settings.mount.to_string(),
        };
        self.record.target = Some(label.as_str().into());
        if self.named.is_some() {
            // What the answer is priced by: the model actually served.
            self.model = served.map(Box::from);
        }
        label
    }

    /// No attempt is left: the last upstream answer goes to the client as it came, else the
    /// gateway's error naming the targets tried.
    fn give_up(
        self,
        held: Option<(Response, &Mount)>,
        err: Option<GatewayError>,
        tried: Vec<String>,
    ) -> Answer {
        match (held, err) {
            (Some((response, mount)), _) => self.answer(response, mount),
            (None, Some(last)) => self.fail(GatewayError::NoUpstreamAnswered {
                tried,
                last: Box::new(last),
            }),
            (None, None) => self.fail(GatewayError::Internal("no attempt made".into())),
        }
    }

    /// Where this request may go: its model's `[models]` targets, or its route's mount.
    fn hops(&self, model: Option<&str>) -> Vec<Hop<'a>> {
        let pipeline = &*self.endpoint.pipeline;
        match self.model_route(model) {
            Some(route) => (route.targets.iter())
                .map(|target| Hop {
                    mount: pipeline.mount(&target.mount),
                    served: target.model.as_deref(),
                })
                .collect(),
            None => vec![Hop {
                mount: &self.route.mount,
                served: None,
            }],
        }
    }

    /// One attempt at `mount`: the upstream request (with the next held key, when it lends
    /// them), sent, and its head waited for.
    async fn attempt(
        &mut self,
        mount: &Mount,
        body: RequestBody,
        timer: &mut Option<&mut Timer<'_>>,
    ) -> Attempt {
        let request = match self.upstream_request(body, mount) {
            Ok(request) => request,
            Err(err) => return Attempt::Failed(err),
        };
        let sending = std::pin::pin!(mount.upstream.send(request));
        match self.wait(sending, mount, timer).await {
            Ok(response) if worth_retrying(response.status) => Attempt::Refused(response),
            Ok(response) => Attempt::Answered(response),
            Err(
                err @ (GatewayError::UpstreamUnreachable(_)
                | GatewayError::UpstreamConnectTimeout { .. }),
            ) => Attempt::Unreached(err),
            Err(err) => Attempt::Failed(err),
        }
    }
}

/// The hop after `at` failed: the same mount when its held key `rested` after a 429 and
/// another key is free, else the next in turn (the next of all when every one is out).
fn next_hop(hops: &[Hop<'_>], at: usize, rested: Option<Lent>, retry: &RetryConfig) -> usize {
    let mount = hops[at].mount;
    if rested.is_some_and(|lent| mount.has_another_key(lent)) {
        return at;
    }
    let count = hops.len();
    (1..=count)
        .map(|step| (at + step) % count)
        .find(|&i| hops[i].mount.health.admits(retry))
        .unwrap_or((at + 1) % count)
}

/// Whether the retry budget lets one more retry go, counting a refusal.
fn retry_fits(pipeline: &Pipeline) -> bool {
    let fits = (pipeline.retry_budget).try_retry(pipeline.config.retry.budget);
    if !fits {
        pipeline.metrics.count_retry_refused();
    }
    fits
}

/// The first hop in turn; the first of all when every one is out.
fn first_in_turn(hops: &[Hop<'_>], retry: &RetryConfig) -> usize {
    (0..hops.len())
        .find(|&i| hops[i].mount.health.admits(retry))
        .unwrap_or(0)
}

/// The body with the model written as `served`, when the target serves another name: at
/// `at` in JSON, or in the form's field (a form's `boundary`).
fn renamed(
    whole: &Bytes,
    served: Option<&str>,
    at: Option<Range<usize>>,
    boundary: Option<&str>,
) -> Bytes {
    let renamed = served.and_then(|served| match (at, boundary) {
        (Some(at), _) => model::renamed_in_json(whole, at, served),
        (None, Some(boundary)) => model::renamed_in_form(whole, boundary, served),
        (None, None) => None,
    });
    renamed.unwrap_or_else(|| whole.clone())
}

/// The client's headers for a whole body: its length as it now is.
fn with_length(mut headers: HeaderMap, body: &RequestBody) -> HeaderMap {
    if let (Body::Whole(whole), true) = (body, headers.contains_key(header::CONTENT_LENGTH)) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
    }
    headers
}
