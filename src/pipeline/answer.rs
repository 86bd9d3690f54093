//! Phase 7: the rules for the answer's head, and who failed when there is no answer.
//!
//! [`Answer`] is what the pipeline gives back to an engine for every request: the upstream's
//! answer on its way through, or one the gateway made itself. Engines only write it.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::StatusCode;

use super::body::{Bound, UploadProgress};
use super::error::GatewayError;
use super::relay::Relay;
use crate::config::UpstreamConfig;
use crate::headers::{is_named, strip_hop_by_hop, HopByHop, Media};
use crate::http1::Framing;
use crate::message::{Body, Head};
use crate::observe::metrics::UpstreamErrorKind;
use crate::upstream::{SendError, Stage};

/// A request's answer, for an engine to write. Its body is whole when the gateway made it (an
/// error, a refusal the upstream sent whole, a 101), and the upstream's as it arrives
/// otherwise. The relay is boxed: an answer moves through several hands on its way to an
/// engine, and the relay is most of its size.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) head: Head,
    pub(crate) body: Body<Box<Relay>>,
}

impl Answer {
    /// The gateway's own answer for `err`, in OpenAI's shape.
    pub(crate) fn error(err: &GatewayError) -> Answer {
        Answer {
            status: err.status(),
            head: Head::Map(err.headers()),
            body: Body::Whole(err.json()),
        }
    }

    /// How the body is delimited, as the engine frames it.
    pub(crate) fn framing(&self) -> Framing {
        match &self.body {
            Body::Whole(body) => Framing::Length(body.len() as u64),
            Body::Stream(relay) => relay.framing(),
        }
    }
}

/// The rules for the upstream's answer head, in order: the headers that belonged to its
/// connection only go ([`HopByHop`]); an event stream is marked so that a proxy in front of
/// the gateway (nginx, an ingress) passes it on as it comes ([`unbuffered`]). Returns the
/// answer's media type, which phase 8 reads too.
pub(crate) fn head_rules(head: &mut Head) -> Media {
    strip_connection_headers(head);
    let media = Media::of(head.get(&header::CONTENT_TYPE));
    if media == Media::EventStream {
        unbuffered(head);
    }
    media
}

/// Removes the headers of an answer that belonged to its connection only ([`HopByHop`]),
/// whichever form the head is in.
pub(crate) fn strip_connection_headers(head: &mut Head) {
    match head {
        Head::Map(map) => strip_hop_by_hop(map),
        Head::Arrived(fields) => {
            let rule = HopByHop::of(fields.get_all(&header::CONNECTION));
            fields.retain(|name| !rule.contains(name));
        }
    }
}

/// Asks the proxies in front not to buffer an event stream: `X-Accel-Buffering: no` (nginx's
/// and its ingress's switch, whatever the upstream said), and `Cache-Control: no-cache` when
/// the upstream gave no caching rule of its own.
fn unbuffered(head: &mut Head) {
    const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");
    head.retain(|name| !is_named(name, X_ACCEL_BUFFERING.as_str().as_bytes()));
    head.append(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    if head.get(&header::CACHE_CONTROL).is_none() {
        head.append(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
}

/// `Server-Timing` (`tracing.server_timing`): the gateway's own time until the answer's head
/// (everything but the upstream's part) and the upstream's time to its head, in
/// milliseconds, for devtools and curl to show the gateway's overhead.
pub(crate) fn server_timing(head: &mut Head, until_head: Duration, upstream: Duration) {
    let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
    let gateway = ms(until_head.saturating_sub(upstream));
    let value = format!("gateway;dur={gateway:.3}, upstream;dur={:.3}", ms(upstream));
    // Digits, letters and punctuation only.
    if let Ok(value) = HeaderValue::from_str(&value) {
        head.append(HeaderName::from_static("server-timing"), value);
    }
}

/// Drops the answer's `Content-Length`, for a body the gateway changes on its way.
pub(crate) fn undeclare_length(head: &mut Head) {
    head.retain(|name| !is_named(name, b"content-length"));
}

/// Says who failed when the request could not be sent or its head never came back: the
/// client (its upload over the limit, stalled past `body_idle`, or broken), else `upstream`.
pub(crate) fn classify(
    err: SendError,
    upload: Option<&UploadProgress>,
    limit: Bound<u64>,
    body_idle: Duration,
    upstream: &UpstreamConfig,
) -> GatewayError {
    if let Some(failed) = upload.filter(|upload| upload.went_wrong()) {
        return upload_failed(failed, limit, body_idle, std::io::Error::other(err.source));
    }
    match err.stage {
        Stage::Connect if err.timed_out() => GatewayError::UpstreamConnectTimeout {
            key_path: Arc::clone(&upstream.key_path),
            timeout: upstream.connect_timeout,
        },
        Stage::Connect => GatewayError::UpstreamUnreachable(err.source),
        Stage::Exchange => GatewayError::UpstreamFailed(err.source),
    }
}

/// How the client's upload went wrong (`err` is what reading it said): over the limit,
/// stalled past `body_idle`, or broken.
pub(crate) fn upload_failed(
    upload: &UploadProgress,
    limit: Bound<u64>,
    body_idle: Duration,
    err: std::io::Error,
) -> GatewayError {
    if upload.over_limit() {
        GatewayError::BodyTooLarge {
            limit: limit.value,
            setting: limit.setting.to_string(),
            declared: None,
        }
    } else if upload.client_stalled() {
        GatewayError::ClientBodyTimeout { timeout: body_idle }
    } else {
        GatewayError::ClientBody(err)
    }
}

/// The upstream's share of a failure, for `oa_bypass_upstream_errors_total`; `None` when the
/// client or the gateway's own limits were the cause.
pub(crate) fn upstream_error_kind(err: &GatewayError) -> Option<UpstreamErrorKind> {
    match err {
        GatewayError::UpstreamUnreachable(_) => Some(UpstreamErrorKind::Connect),
        GatewayError::UpstreamConnectTimeout { .. } | GatewayError::UpstreamTimeout { .. } => {
            Some(UpstreamErrorKind::Timeout)
        }
        GatewayError::UpstreamFailed(_) => Some(UpstreamErrorKind::Reset),
        GatewayError::NoUpstreamAnswered { last, .. } => upstream_error_kind(last),
        GatewayError::MissingCredential(_)
        | GatewayError::KeyNotAllowed
        | GatewayError::KeyExpired { .. }
        | GatewayError::RouteNotAllowed { .. }
        | GatewayError::ModelNotAllowed { .. }
        | GatewayError::ModelNotPriced { .. }
        | GatewayError::KeyLimited { .. }
        | GatewayError::NoUsage
        | GatewayError::AddressNotAllowed
        | GatewayError::RateLimited { .. }
        | GatewayError::TooBusy { .. }
        | GatewayError::UnknownRoute { .. }
        | GatewayError::MethodNotAllowed { .. }
        | GatewayError::InvalidPathParam { .. }
        | GatewayError::BodyTooLarge { .. }
        | GatewayError::ClientBodyTimeout { .. }
        | GatewayError::UnsupportedMediaType { .. }
        | GatewayError::ClientBody(_)
        | GatewayError::NotAWebSocket(_)
        | GatewayError::Internal(_)
        | GatewayError::StoreUnavailable => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn method_not_allowed_lists_allow_header_and_openai_shape() {
        let err = GatewayError::MethodNotAllowed {
            method: Method::DELETE,
            template: "/v1/embeddings".into(),
            allowed: vec![Method::POST],
        };
        let answer = Answer::error(&err);
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(answer.head.get(&header::ALLOW), Some(&b"POST"[..]));
        let Body::Whole(body) = answer.body else {
            panic!("an error's body is whole")
        };
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["error"]["message"],
            "Method DELETE is not allowed on /v1/embeddings; allowed: POST"
        );
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["param"].is_null());
        assert_eq!(body["error"]["code"], "method_not_allowed");
    }
}
