//! hyper's engine: HTTP/1.1, HTTP/2, TLS and upgrades, behind poem's router, which registers
//! each path template of the manifest. A template's route is an adapter: it turns poem's
//! request into the pipeline's, and the pipeline's answer into poem's response.

use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::FutureExt;
use http::header;
use http::uri::PathAndQuery;
use poem::{Body, Endpoint, Request, Response};

use crate::message::Io;
use crate::message::{Body as MessageBody, RequestBody};
use crate::pipeline::{self, Answer};
use crate::realtime::ClientUpgrade;

/// The pipeline's endpoint of one path template, as poem's router serves it.
pub(crate) struct TemplateRoute(pub Arc<pipeline::Endpoint>);

impl Endpoint for TemplateRoute {
    type Output = Response;

    fn call(&self, mut req: Request) -> impl Future<Output = poem::Result<Response>> + Send {
        // The body's own size hint knows what headers cannot: an HTTP/2 request may carry a
        // body with neither Content-Length nor Transfer-Encoding.
        let body = req.take_body();
        let has_body = !body.is_empty();
        let upgrade = client_upgrade(&req);
        let request = pipeline::Request {
            method: req.method().clone(),
            target: req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            headers: std::mem::take(req.headers_mut()),
            peer: req.remote_addr().as_socket_addr().copied(),
            has_body,
        };
        let body = if has_body {
            MessageBody::Stream(body.into())
        } else {
            RequestBody::Whole(Bytes::new())
        };
        // Admitted here, so the future holds what the pipeline needs rather than the whole
        // request.
        let answer = match self.0.admit(request) {
            Ok(admitted) => Either::Left(admitted.forward(body, upgrade, None)),
            Err(refusal) => Either::Right(std::future::ready(refusal)),
        };
        answer.map(|answer| Ok(into_response(answer)))
    }
}

/// The client's side of a WebSocket, for a request that asks to upgrade and a connection
/// that can (HTTP/1.1).
fn client_upgrade(req: &Request) -> Option<ClientUpgrade> {
    if !req.headers().contains_key(header::UPGRADE) {
        return None;
    }
    let on_upgrade = req.take_upgrade().ok()?;
    Some(Box::pin(async move {
        match on_upgrade.await {
            Ok(upgraded) => Ok(Box::new(upgraded) as Box<dyn Io>),
            Err(err) => Err(io::Error::other(err)),
        }
    }))
}

/// The pipeline's answer as poem's response.
pub(crate) fn into_response(answer: Answer) -> Response {
    let body = match answer.body {
        MessageBody::Whole(body) => Body::from(body),
        MessageBody::Stream(relay) => Body::from_bytes_stream(relay),
    };
    let mut response = Response::builder().status(answer.status).body(body);
    *response.headers_mut() = answer.head.into_map();
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, BUILT_IN_MANIFEST};
    use crate::observe::metrics::Metrics;
    use crate::pipeline::limits::Limiter;
    use crate::pipeline::Pipeline;
    use crate::realtime::Sessions;

    /// The future of a forwarded request lives in hyper's per-request slot and is copied when
    /// boxed, for every request in flight: it holds what the request needs and no more
    /// (docs/performance.md has its history).
    #[test]
    fn a_forwarded_request_future_stays_small() {
        let config = Config::from_manifest_str(BUILT_IN_MANIFEST).unwrap();
        let metrics = Arc::new(Metrics::new(&config.metrics));
        let limiter = Arc::new(Limiter::new(&config.limits.admission, None));
        let tls = crate::upstream::tls::client_config().unwrap();
        let config = Arc::new(config);
        let pipeline = Arc::new(
            Pipeline::new(
                &config,
                crate::pipeline::Kept {
                    limiter,
                    ledger: crate::ledger::Ledger::in_memory(),
                    pools: Vec::new(),
                    health: Vec::new(),
                    retry_budget: Arc::new(crate::pipeline::health::RetryBudget::new()),
                },
                metrics,
                Sessions::default(),
                &tls,
            )
            .unwrap(),
        );
        let endpoints = pipeline.endpoints().unwrap();
        let (_, endpoint) = endpoints
            .iter()
            .find(|(template, _)| template.as_str() == "/v1/chat/completions")
            .unwrap();
        let route = TemplateRoute(Arc::clone(endpoint));
        let request = Request::builder()
            .method(http::Method::POST)
            .uri(http::Uri::from_static("/v1/chat/completions"))
            .header(header::AUTHORIZATION, "Bearer sk-test")
            .content_type("application/json")
            .body("{}");
        let future = route.call(request);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 2048, "a forwarded request's future is {size} bytes");
    }
}
