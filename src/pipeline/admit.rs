//! Phases 1–4: an endpoint takes a request's head and admits it or answers it.

use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{HeaderMap, Method};
use tokio::time::Instant;

use super::access::{self, KeyId};
use super::body::Bound;
use super::limits::Admission;
use super::{Answer, GatewayError, Mount, Pipeline};
use crate::observe::log;
use crate::observe::metrics::RouteMetrics;
use crate::routes::{check_path_param, RouteSpec};

/// One method of a template: its manifest entry, the mount it goes to, and its metric
/// handles.
pub(super) struct MethodRoute {
    pub(super) spec: RouteSpec,
    pub(super) mount: Arc<Mount>,
    pub(super) metrics: Arc<RouteMetrics>,
}

/// Every method of one path template: what an engine's router maps a path to.
pub(crate) struct Endpoint {
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) template: Arc<str>,
    /// How long its mount's prefix is: that much of the path stays behind.
    pub(super) strip: usize,
    pub(super) methods: Vec<MethodRoute>,
}

/// A request's head as an engine hands it over.
pub(crate) struct Request {
    pub method: Method,
    /// Path and query as sent, without the path secret in front.
    pub target: PathAndQuery,
    pub headers: HeaderMap,
    /// The peer's address: the client's, or a proxy's in front of it.
    pub peer: Option<SocketAddr>,
    /// A body follows (HTTP/2 may carry one without `Content-Length`).
    pub has_body: bool,
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
        let start = Instant::now();
        let Request {
            method,
            target,
            headers,
            peer,
            has_body,
        } = request;
        let pipeline = &*self.pipeline;
        // 1. Client address and access.
        if let Err(err) = pipeline
            .access
            .check_ip(peer.map(|peer| peer.ip()), &headers)
        {
            return Err(pipeline.refuse_address(&method, start, &err));
        }
        // 2. Route and method.
        let Some(route) = self
            .methods
            .iter()
            .find(|route| route.spec.method == method)
        else {
            let err = GatewayError::MethodNotAllowed {
                method: method.clone(),
                template: self.template.to_string(),
                allowed: self.methods.iter().map(|r| r.spec.method.clone()).collect(),
            };
            return Err(self.reject(&method, start, &err));
        };
        let checked = check_path_params(&route.spec, target.path())
            // 3. Credential and limits.
            .and_then(|()| self.admit_key(&route.mount, &headers, peer))
            // 4. Body policy.
            .and_then(|(admission, key)| {
                let limit = pipeline.bodies.check(&route.spec, &headers, has_body)?;
                Ok((admission, key, limit))
            });
        match checked {
            Ok((admission, key, limit)) => Ok(Admitted {
                endpoint: self,
                route,
                method,
                target,
                headers,
                key,
                admission,
                start,
                limit,
            }),
            Err(err) => Err(self.reject(&method, start, &err)),
        }
    }

    /// Phase 3: a key is presented where the route's mount reads it, and allowed; then the
    /// rate and concurrency limits.
    fn admit_key(
        &self,
        mount: &Mount,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<(Admission, KeyId), GatewayError> {
        let pipeline = &*self.pipeline;
        // The first key presented; none at all is refused before anything else.
        let Some(key) = access::presented_key(headers, mount.credential) else {
            return Err(GatewayError::MissingCredential(mount.credential));
        };
        // A mount that lends its keys has `allowed_key_hashes` to check against (the
        // configuration refuses one without).
        pipeline.access.check_key(headers, mount.credential)?;
        let ip = peer.map(|peer| pipeline.access.client_ip(peer.ip(), headers));
        let key = KeyId::of(key);
        let admission = pipeline.limiter.admit(ip, &key.hash)?;
        Ok((admission, key))
    }

    /// The gateway's answer to a request it refuses, counted under this route (and under the
    /// limit that refused it) and logged.
    pub(super) fn reject(&self, method: &Method, start: Instant, err: &GatewayError) -> Answer {
        if let GatewayError::RateLimited { setting, .. } | GatewayError::TooBusy { setting, .. } =
            err
        {
            self.pipeline.metrics.count_rate_limited(setting);
        }
        let answer = Answer::error(err);
        let status = answer.status.as_u16();
        self.pipeline
            .metrics
            .count_request(&self.template, method, status);
        log::rejected(method, &self.template, status, start, &err.to_string());
        answer
    }
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

/// A request through phases 1–4, waiting for its body.
pub(crate) struct Admitted<'a> {
    pub(super) endpoint: &'a Endpoint,
    pub(super) route: &'a MethodRoute,
    pub(super) method: Method,
    pub(super) target: PathAndQuery,
    pub(super) headers: HeaderMap,
    pub(super) key: KeyId,
    pub(super) admission: Admission,
    pub(super) start: Instant,
    pub(super) limit: Bound<u64>,
}
