//! Phases 1–4: an endpoint takes a request's head and admits it or answers it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode};
use tokio::time::Instant;

use super::access::Caller;
use super::body::{self, Bound, UploadProgress};
use super::budget;
use super::limits::Admission;
use super::mount::Lent;
use super::{answer, Answer, GatewayError, Mount, Pipeline};
use crate::config::NamedKey;
use crate::observe::log::Record;
use crate::observe::metrics::{GaugeGuard, RouteMetrics};
use crate::observe::traces::RequestSpan;
use crate::routes::{check_path_param, RouteSpec};
use crate::store::Spend;

/// One method of a template: its manifest entry, the mount it goes to, and its metric
/// handles.
pub(super) struct MethodRoute {
    pub(super) spec: RouteSpec,
    pub(super) mount: Arc<Mount>,
    pub(super) metrics: Arc<RouteMetrics>,
    /// `[models]` picks its upstream by the request's model.
    pub(super) routes_by_model: bool,
    /// Its answer (the models list) gains `[models]`'s aliases.
    pub(super) lists_aliases: bool,
}

/// Every method of one path template: what an engine's router maps a path to.
pub(crate) struct Endpoint {
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) template: Arc<str>,
    /// How long its mount's prefix is: that much of the path stays behind.
    pub(super) prefix_len: usize,
    pub(super) methods: Vec<MethodRoute>,
}

/// A request's head as an engine hands it over.
pub(crate) struct Request {
    pub(crate) method: Method,
    /// Path and query as sent, without the path secret in front.
    pub(crate) target: PathAndQuery,
    pub(crate) headers: HeaderMap,
    /// The peer's address: the client's, or a proxy's in front of it.
    pub(crate) peer: Option<SocketAddr>,
    /// A body follows (HTTP/2 may carry one without `Content-Length`).
    pub(crate) has_body: bool,
}

/// A request through phases 1–4, waiting for its body; then, on its way upstream, what the
/// steps of phases 5–8 share. One struct taken apart in place: the forwarded request's future
/// holds it once, where a second struct moved out of it would take room of its own.
pub(crate) struct Admitted<'a> {
    pub(super) endpoint: &'a Endpoint,
    pub(super) route: &'a MethodRoute,
    pub(super) target: PathAndQuery,
    pub(super) headers: HeaderMap,
    pub(super) admission: Admission,
    pub(super) limit: Bound<u64>,
    /// Its log line, opened in phase 1.
    pub(super) record: Record,
    /// A streamed upload's progress: a whole body has nothing left to watch.
    pub(super) upload: Option<Arc<UploadProgress>>,
    /// Its place in `requests_in_flight`, from when it goes upstream.
    pub(super) in_flight: Option<GaugeGuard>,
    /// Its span, when traces are on. Boxed: a request carries its room only then.
    pub(super) trace: Option<Box<RequestSpan>>,
    /// The held key it went up with.
    pub(super) lent: Option<Lent>,
    /// The gateway asked for the stream's usage on the client's behalf.
    pub(super) asked_for_usage: bool,
    /// The caller's `[keys.NAME]`, when its key has a name.
    pub(super) named: Option<Arc<NamedKey>>,
    /// The model the request names, when a named key's rules read it.
    pub(super) model: Option<Box<str>>,
}

impl Endpoint {
    /// Where the template's first route stands in the manifest, for messages.
    pub(crate) fn manifest_index(&self) -> usize {
        self.methods.first().map_or(0, |route| route.spec.index)
    }

    /// Phases 1–4: everything decided from the head, before any body is read or the
    /// upstream contacted. `Err` is the gateway's answer, already counted and logged.
    // The refusal is an answer like any other, a few words over clippy's bound: not boxed.
    #[allow(clippy::result_large_err)]
    pub(crate) fn admit(&self, request: Request) -> Result<Admitted<'_>, Answer> {
        let Request {
            method,
            target,
            headers,
            peer,
            has_body,
        } = request;
        let mut record = Record::open(method, Arc::clone(&self.template), Instant::now());
        let pipeline = &*self.pipeline;
        // 1. Client address and access.
        if let Err(err) = (pipeline.config.access).check_ip(peer.map(|peer| peer.ip()), &headers) {
            return Err(pipeline.refuse_address(&record.method, record.start, &err));
        }
        // 2. Route and method.
        let Some(route) = self.route(&record.method) else {
            return Err(self.reject(&record, &self.method_not_allowed(&record.method)));
        };
        // 2, its path parameters; then 3. Credential and limits: who calls, named in the
        // line from here on.
        let caller = check_path_params(&route.spec, target.path())
            .and_then(|()| self.identify(route, &headers));
        let caller = match caller {
            Ok(caller) => caller,
            Err(err) => return Err(self.reject(&record, &err)),
        };
        record.key = Some(caller.key.prefix());
        record.key_name = caller.named.as_ref().map(|named| Arc::clone(&named.name));
        let checked = self
            .admit_caller(route, &caller, &headers, peer)
            // 4. Body policy.
            .and_then(|admission| {
                let limits = &pipeline.config.limits;
                let limit = body::check(limits, &route.spec, &headers, has_body)?;
                Ok((admission, limit))
            });
        match checked {
            Ok((admission, limit)) => Ok(Admitted {
                endpoint: self,
                route,
                target,
                headers,
                admission,
                limit,
                record,
                upload: None,
                in_flight: None,
                trace: None,
                lent: None,
                asked_for_usage: false,
                named: caller.named,
                model: None,
            }),
            Err(err) => Err(self.reject(&record, &err)),
        }
    }

    /// The route of `method` at this template.
    fn route(&self, method: &Method) -> Option<&MethodRoute> {
        self.methods
            .iter()
            .find(|route| route.spec.method == method)
    }

    fn method_not_allowed(&self, method: &Method) -> GatewayError {
        GatewayError::MethodNotAllowed {
            method: method.clone(),
            template: self.template.to_string(),
            allowed: self.methods.iter().map(|r| r.spec.method.clone()).collect(),
        }
    }

    /// Phase 3: a key is presented where the route's mount reads it, and allowed. A mount
    /// that lends its keys has listed keys to check against (the configuration refuses one
    /// without).
    fn identify(&self, route: &MethodRoute, headers: &HeaderMap) -> Result<Caller, GatewayError> {
        let access = &self.pipeline.config.access;
        access.identify(headers, route.mount.settings.credential_header)
    }

    /// Phase 3 for a known caller: a named key within its last day and tags; then the rate
    /// and concurrency limits.
    fn admit_caller(
        &self,
        route: &MethodRoute,
        caller: &Caller,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<Admission, GatewayError> {
        let pipeline = &*self.pipeline;
        if let Some(named) = &caller.named {
            check_named(named, &route.spec)?;
            if named.limits.any() {
                budget::admit(
                    &pipeline.ledger,
                    &pipeline.metrics,
                    named,
                    SystemTime::now(),
                )?;
            }
        }
        let ip = peer.map(|peer| pipeline.config.access.client_ip(peer.ip(), headers));
        pipeline.limiter.admit(ip, &caller.key.hash)
    }

    /// The gateway's answer to a request it refuses, counted under this route and logged
    /// with the error as its reason.
    pub(super) fn reject(&self, record: &Record, err: &GatewayError) -> Answer {
        self.pipeline.refuse(record, err, &err.to_string())
    }

    /// The answer to a request of `route` that failed after admission: [`Endpoint::reject`]'s,
    /// counted under its mount too, and as the upstream's failure when it was one.
    pub(super) fn failed(
        &self,
        route: &MethodRoute,
        record: &Record,
        err: &GatewayError,
    ) -> Answer {
        if let Some(kind) = answer::upstream_error_kind(err) {
            route.metrics.count_upstream_error(kind);
        }
        let answer = self.reject(record, err);
        route.metrics.count_mount_status(answer.status.as_u16());
        answer
    }

    /// Counts the answer to an admitted request of `route`: its status, and the time to its
    /// head.
    pub(super) fn answered(&self, route: &MethodRoute, record: &Record, status: StatusCode) {
        route.metrics.count_status(status.as_u16());
        route
            .metrics
            .observe_response_headers(record.start.elapsed());
    }
}

impl Admitted<'_> {
    /// Whether phase 3 has a question left for the store: `[limits]`, or a named key's
    /// rates and budgets.
    pub(super) fn is_pending(&self) -> bool {
        self.admission.is_pending() || self.spend().is_some()
    }

    /// The store a named key's counts are checked in, when they are.
    fn spend(&self) -> Option<&Spend> {
        self.named.as_ref().filter(|named| named.limits.any())?;
        self.endpoint.pipeline.ledger.shared()
    }

    /// Phase 3's questions to the store, sent together: both scripts go out on one
    /// multiplexed connection, so they take one round trip.
    pub(super) async fn settle(&mut self) -> Result<(), GatewayError> {
        let pipeline = &*self.endpoint.pipeline;
        let spend = (self.named.as_deref())
            .filter(|named| named.limits.any())
            .zip(pipeline.ledger.shared());
        let limits = pipeline.limiter.settle(&mut self.admission);
        let budget = async {
            match spend {
                Some((named, spend)) => {
                    budget::settle(spend, &pipeline.metrics, named, SystemTime::now()).await
                }
                None => Ok(()),
            }
        };
        let (limits, budget) = futures_util::join!(limits, budget);
        limits.and(budget)
    }
}

/// Phase 3 for a named key: within its last day (401), and allowed the route's tag (403).
fn check_named(named: &NamedKey, route: &RouteSpec) -> Result<(), GatewayError> {
    if named.expired_at(SystemTime::now()) {
        return Err(GatewayError::KeyExpired {
            name: Arc::clone(&named.name),
            expired: named.expires.map(|day| day.to_string()).unwrap_or_default(),
        });
    }
    let tag = route.tag_or_default();
    if !named.allows_tag(tag) {
        return Err(GatewayError::RouteNotAllowed {
            name: Arc::clone(&named.name),
            tag: tag.to_owned(),
            allowed: named.tags.clone().unwrap_or_default(),
        });
    }
    Ok(())
}

/// Phase 2's check of each path parameter (a route without parameters has nothing to check).
fn check_path_params(route: &RouteSpec, path: &str) -> Result<(), GatewayError> {
    if route.template.params().next().is_none() {
        return Ok(());
    }
    for (param, decoded) in route.template.params_in(path) {
        check_path_param(decoded.as_deref()).map_err(|problem| GatewayError::InvalidPathParam {
            param: param.to_owned(),
            problem: problem.describe(),
        })?;
    }
    Ok(())
}
