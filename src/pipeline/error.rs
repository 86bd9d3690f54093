//! Errors the gateway itself answers with, in OpenAI's JSON shape: the status, the body and
//! the headers of each, which [`super::Answer::error`] puts together once for every engine.
//!
//! Statuses say who failed: the client (4xx), the upstream (502/504) or us (500). Upstream
//! 4xx/5xx answers are not errors here: they pass through untouched. Messages never carry the
//! client's key, its body, or the upstream URL's query.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use serde::Serialize;

use crate::config::units::{format_duration, format_size};
use crate::config::{CredentialHeader, KeyLimit};
use crate::upstream::chain;

/// What a request without a key is told, by where its mount reads one.
fn missing_credential(header: CredentialHeader) -> String {
    match header {
        CredentialHeader::Authorization | CredentialHeader::ApiKey => {
            "You didn't provide an API key. You need to provide your API key in an Authorization \
             header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as an api-key \
             header."
                .to_owned()
        }
        CredentialHeader::XApiKey | CredentialHeader::XGoogApiKey => format!(
            "You didn't provide an API key. This path takes it in the {} header.",
            header.as_str()
        ),
    }
}

/// What a named key's limit counts and over which period, for messages.
fn counted(limit: KeyLimit) -> &'static str {
    match limit {
        KeyLimit::RequestsPerMinute => "requests this minute",
        KeyLimit::TokensPerMinute => "tokens this minute",
        KeyLimit::TokensPerDay => "tokens today (UTC)",
        KeyLimit::TokensPerMonth => "tokens this month (UTC)",
        KeyLimit::UsdPerDay => "US dollars today (UTC)",
        KeyLimit::UsdPerMonth => "US dollars this month (UTC)",
    }
}

/// OpenAI's `type` and `code` of a refusal at a named key's limit.
fn key_limit_kind_and_code(limit: KeyLimit) -> (&'static str, &'static str) {
    match limit {
        KeyLimit::RequestsPerMinute => ("requests", "rate_limit_exceeded"),
        KeyLimit::TokensPerMinute => ("tokens", "tokens_per_minute_exceeded"),
        KeyLimit::TokensPerDay
        | KeyLimit::TokensPerMonth
        | KeyLimit::UsdPerDay
        | KeyLimit::UsdPerMonth => ("insufficient_quota", "budget_exceeded"),
    }
}

/// Something went wrong with one request, before or while it was forwarded.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{}", missing_credential(*.0))]
    MissingCredential(CredentialHeader),

    #[error("This API key is not allowed on this gateway (access.allowed_key_hashes)")]
    KeyNotAllowed,

    #[error("The API key {name:?} expired at the end of {expired} (UTC) (keys.{name}.expires)")]
    KeyExpired { name: Arc<str>, expired: String },

    #[error(
        "The API key {name:?} may not call {tag} routes; it may call {} (keys.{name}.tags)",
        .allowed.join(", ")
    )]
    RouteNotAllowed {
        name: Arc<str>,
        tag: String,
        allowed: Vec<String>,
    },

    #[error(
        "The API key {name:?} may not use {}; it may use {} (keys.{name}.models)",
        .model.as_deref().map_or_else(|| "a request that names no model".to_owned(), |m| format!("the model {m:?}")),
        .allowed.join(", ")
    )]
    ModelNotAllowed {
        name: Arc<str>,
        /// `None`: the request names none the gateway could read.
        model: Option<String>,
        allowed: Vec<String>,
    },

    #[error(
        "The API key {name:?} may not use {}: it has a dollar budget, and no price is known for it (prices.toml, [prices])",
        .model.as_deref().map_or_else(|| "a request that names no model".to_owned(), |m| format!("the model {m:?}"))
    )]
    ModelNotPriced {
        name: Arc<str>,
        model: Option<String>,
    },

    #[error(
        "The API key {name:?} has used {used} of its {allowed} {} (keys.{name}.{}); it resets at {resets_at}",
        counted(*.limit),
        .limit.field()
    )]
    KeyLimited {
        name: Arc<str>,
        limit: KeyLimit,
        used: String,
        allowed: String,
        retry_after: Duration,
        resets_at: String,
    },

    #[error(
        "This API key is not one of the gateway's [keys], so it counts nothing for it; /usage reports a named key's own limits"
    )]
    NoUsage,

    #[error("Your address is not allowed to use this gateway (access.allowed_ips)")]
    AddressNotAllowed,

    #[error(
        "Rate limit reached on this gateway ({setting} = {per_minute}); retry after {}",
        format_duration(Duration::from_secs(retry_after_secs(*.retry_after)))
    )]
    RateLimited {
        setting: &'static str,
        per_minute: u32,
        retry_after: Duration,
    },

    #[error("The gateway is at {setting} ({limit} requests at once); retry shortly")]
    TooBusy { setting: &'static str, limit: u32 },

    #[error(
        "The gateway cannot reach its limits store (limits.store), and limits.store_failure = \"closed\" refuses requests until it can; retry shortly"
    )]
    StoreUnavailable,

    #[error("Invalid URL ({method} {path}): this gateway serves no such route")]
    UnknownRoute { method: Method, path: String },

    #[error("Method {method} is not allowed on {template}; allowed: {}", join_methods(.allowed))]
    MethodNotAllowed {
        method: Method,
        template: String,
        allowed: Vec<Method>,
    },

    #[error("Path parameter {param} {problem}; it must name a single path segment")]
    InvalidPathParam {
        param: String,
        problem: &'static str,
    },

    #[error(
        "Request body {} is over the limit of {} ({setting}) for this route",
        .declared.map_or_else(|| "streamed so far".to_owned(), |n| format!("of {n} bytes")),
        format_size(*.limit)
    )]
    BodyTooLarge {
        limit: u64,
        setting: String,
        declared: Option<u64>,
    },

    #[error(
        "The request body stalled for longer than server.body_read_timeout ({})",
        format_duration(*.timeout)
    )]
    ClientBodyTimeout { timeout: Duration },

    #[error("This route takes {accepted} bodies; the request declares Content-Type {declared:?}")]
    UnsupportedMediaType { declared: String, accepted: String },

    #[error("The request body could not be read from the client")]
    ClientBody(#[source] std::io::Error),

    #[error("{0}")]
    NotAWebSocket(&'static str),

    /// Every attempt failed without an answer: the targets tried (`mount/model: what
    /// happened`); the last attempt's error decides the status and code.
    #[error("No upstream answered; tried {}", .tried.join("; "))]
    NoUpstreamAnswered {
        tried: Vec<String>,
        last: Box<GatewayError>,
    },

    #[error("The upstream could not be reached: {}", chain(.0.as_ref()))]
    UpstreamUnreachable(#[source] Box<dyn std::error::Error + Send + Sync>),

    #[error(
        "The upstream did not accept a connection within {key_path}.connect_timeout ({})",
        format_duration(*.timeout)
    )]
    UpstreamConnectTimeout {
        key_path: Arc<str>,
        timeout: Duration,
    },

    #[error(
        "The upstream did not answer within {setting} ({})",
        format_duration(*.timeout)
    )]
    UpstreamTimeout { setting: String, timeout: Duration },

    #[error("The upstream failed to answer: {}", chain(.0.as_ref()))]
    UpstreamFailed(#[source] Box<dyn std::error::Error + Send + Sync>),

    #[error("Internal gateway error: {0}")]
    Internal(String),
}

/// Whole seconds to wait, rounded up, at least one (RFC 9110 §10.2.3 takes integers).
fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

fn join_methods(methods: &[Method]) -> String {
    methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::MissingCredential(_)
            | GatewayError::KeyNotAllowed
            | GatewayError::KeyExpired { .. } => StatusCode::UNAUTHORIZED,
            GatewayError::AddressNotAllowed
            | GatewayError::RouteNotAllowed { .. }
            | GatewayError::ModelNotAllowed { .. }
            | GatewayError::ModelNotPriced { .. } => StatusCode::FORBIDDEN,
            GatewayError::RateLimited { .. }
            | GatewayError::TooBusy { .. }
            | GatewayError::KeyLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UnknownRoute { .. } | GatewayError::NoUsage => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::InvalidPathParam { .. } | GatewayError::ClientBody(_) => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::ClientBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            GatewayError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::NotAWebSocket(_) => StatusCode::UPGRADE_REQUIRED,
            GatewayError::UpstreamUnreachable(_) | GatewayError::UpstreamFailed(_) => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout { .. } | GatewayError::UpstreamConnectTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::NoUpstreamAnswered { last, .. } => last.status(),
        }
    }

    /// OpenAI's `type` and `code` for this error.
    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            GatewayError::MissingCredential(_) => {
                ("invalid_request_error", Some("missing_api_key"))
            }
            GatewayError::KeyNotAllowed => ("invalid_request_error", Some("invalid_api_key")),
            GatewayError::KeyExpired { .. } => ("invalid_request_error", Some("key_expired")),
            GatewayError::RouteNotAllowed { .. } => ("permission_error", Some("route_not_allowed")),
            GatewayError::ModelNotAllowed { .. } => ("permission_error", Some("model_not_allowed")),
            GatewayError::ModelNotPriced { .. } => ("permission_error", Some("model_not_priced")),
            GatewayError::NoUsage => ("invalid_request_error", Some("no_usage")),
            GatewayError::KeyLimited { limit, .. } => {
                let (kind, code) = key_limit_kind_and_code(*limit);
                (kind, Some(code))
            }
            GatewayError::AddressNotAllowed => ("permission_error", Some("address_not_allowed")),
            GatewayError::RateLimited { .. } => ("requests", Some("rate_limit_exceeded")),
            GatewayError::TooBusy { .. } => ("requests", Some("concurrency_limit_exceeded")),
            GatewayError::UnknownRoute { .. } => ("invalid_request_error", Some("unknown_url")),
            GatewayError::MethodNotAllowed { .. } => {
                ("invalid_request_error", Some("method_not_allowed"))
            }
            GatewayError::InvalidPathParam { .. } => {
                ("invalid_request_error", Some("invalid_path_parameter"))
            }
            GatewayError::BodyTooLarge { .. } => {
                ("invalid_request_error", Some("request_too_large"))
            }
            GatewayError::ClientBody(_) => ("invalid_request_error", Some("body_read_failed")),
            GatewayError::ClientBodyTimeout { .. } => {
                ("invalid_request_error", Some("body_read_timeout"))
            }
            GatewayError::UnsupportedMediaType { .. } => {
                ("invalid_request_error", Some("unsupported_media_type"))
            }
            GatewayError::NotAWebSocket(_) => ("invalid_request_error", Some("websocket_required")),
            GatewayError::UpstreamUnreachable(_) => ("gateway_error", Some("upstream_unreachable")),
            GatewayError::UpstreamTimeout { .. } | GatewayError::UpstreamConnectTimeout { .. } => {
                ("gateway_error", Some("upstream_timeout"))
            }
            GatewayError::UpstreamFailed(_) => ("gateway_error", Some("upstream_failed")),
            GatewayError::Internal(_) => ("server_error", Some("internal_error")),
            GatewayError::StoreUnavailable => ("server_error", Some("limits_store_unavailable")),
            GatewayError::NoUpstreamAnswered { last, .. } => last.kind_and_code(),
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            GatewayError::InvalidPathParam { param, .. } => Some(param),
            GatewayError::ModelNotAllowed { .. } | GatewayError::ModelNotPriced { .. } => {
                Some("model")
            }
            GatewayError::KeyLimited { .. } | GatewayError::NoUsage => None,
            GatewayError::MissingCredential(_)
            | GatewayError::KeyNotAllowed
            | GatewayError::KeyExpired { .. }
            | GatewayError::RouteNotAllowed { .. }
            | GatewayError::AddressNotAllowed
            | GatewayError::RateLimited { .. }
            | GatewayError::TooBusy { .. }
            | GatewayError::UnknownRoute { .. }
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::ClientBody(_)
            | GatewayError::ClientBodyTimeout { .. }
            | GatewayError::UnsupportedMediaType { .. }
            | GatewayError::NotAWebSocket(_)
            | GatewayError::UpstreamUnreachable(_)
            | GatewayError::UpstreamTimeout { .. }
            | GatewayError::UpstreamConnectTimeout { .. }
            | GatewayError::UpstreamFailed(_)
            | GatewayError::NoUpstreamAnswered { .. }
            | GatewayError::Internal(_)
            | GatewayError::StoreUnavailable => None,
        }
    }

    /// The OpenAI-shaped JSON body of this error.
    pub fn json(&self) -> Bytes {
        let (kind, code) = self.kind_and_code();
        let body = ErrorBody {
            error: ErrorFields {
                message: self.to_string(),
                kind,
                param: self.param(),
                code,
            },
        };
        let json = serde_json::to_vec(&body).unwrap_or_else(|_| {
            br#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#
                .to_vec()
        });
        Bytes::from(json)
    }

    /// The headers of this error's answer: its content type, and what the status asks for
    /// (`Allow`, `Retry-After`, `Upgrade`).
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let GatewayError::MethodNotAllowed { allowed, .. } = self {
            if let Ok(value) = HeaderValue::from_str(&join_methods(allowed)) {
                headers.insert(header::ALLOW, value);
            }
        }
        if let GatewayError::RateLimited { retry_after, .. }
        | GatewayError::KeyLimited { retry_after, .. } = self
        {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(*retry_after)),
            );
        }
        if let GatewayError::TooBusy { .. } | GatewayError::StoreUnavailable = self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let GatewayError::NotAWebSocket(_) = self {
            // RFC 9110 §15.5.22: a 426 names the protocol to switch to.
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn body_too_large_names_the_setting() {
        let err = GatewayError::BodyTooLarge {
            limit: 64 << 20,
            setting: "limits.max_json_body".into(),
            declared: Some(70_000_000),
        };
        assert_eq!(
            err.to_string(),
            "Request body of 70000000 bytes is over the limit of 64MiB (limits.max_json_body) for this route"
        );
    }
}
