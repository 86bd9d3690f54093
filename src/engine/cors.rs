//! CORS for browser apps calling the gateway directly.
//!
//! Preflights are answered here, before routing, with the method and headers the browser
//! asked for; actual responses get `Access-Control-Allow-Origin` and expose every header, so
//! a browser app can read `x-request-id` and the rate-limit headers. A request from an origin
//! that is not allowed gets no CORS headers, and the browser withholds the answer.

use std::future::{ready, Future};

use futures_util::future::Either;
use http::{header, HeaderValue, Method, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};

use crate::config::CorsConfig;

/// How long a browser may cache a preflight answer.
const MAX_AGE_SECS: &str = "86400";

pub(crate) struct Cors<E> {
    inner: E,
    config: CorsConfig,
}

impl<E> Cors<E> {
    pub(crate) fn new(inner: E, config: CorsConfig) -> Self {
        Cors { inner, config }
    }

    /// The `Access-Control-Allow-Origin` value for this origin, if it is allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.config.allows_any() {
            Some(HeaderValue::from_static("*"))
        } else if self
            .config
            .allow_origins
            .iter()
            .any(|allowed| allowed.as_bytes() == origin.as_bytes())
        {
            Some(origin.clone())
        } else {
            None
        }
    }
}

fn is_preflight(req: &Request) -> bool {
    req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

impl<E: Endpoint> Endpoint for Cors<E> {
    type Output = Response;

    fn call(&self, req: Request) -> impl Future<Output = poem::Result<Response>> + Send {
        let allowed = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|origin| self.allow_origin(origin));
        // Decided before the inner call, which takes the request: the future then holds only
        // the inner one and the header to add.
        match allowed {
            Some(allow_origin) if is_preflight(&req) => {
                Either::Left(ready(Ok(preflight(allow_origin, &req))))
            }
            allowed => {
                let inner = self.inner.call(req);
                Either::Right(async move {
                    let mut response = inner.await?.into_response();
                    if let Some(allow_origin) = allowed {
                        let specific = allow_origin != "*";
                        let headers = response.headers_mut();
                        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
                        headers.insert(
                            header::ACCESS_CONTROL_EXPOSE_HEADERS,
                            HeaderValue::from_static("*"),
                        );
                        if specific {
                            headers.append(header::VARY, HeaderValue::from_static("Origin"));
                        }
                    }
                    Ok(response)
                })
            }
        }
    }
}

/// The answer to an allowed preflight: the method and headers the browser asked for.
fn preflight(allow_origin: HeaderValue, req: &Request) -> Response {
    let mut response = Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin)
        .header(header::ACCESS_CONTROL_MAX_AGE, MAX_AGE_SECS)
        .finish();
    let headers = response.headers_mut();
    for (asked, answer) in [
        (
            header::ACCESS_CONTROL_REQUEST_METHOD,
            header::ACCESS_CONTROL_ALLOW_METHODS,
        ),
        (
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            header::ACCESS_CONTROL_ALLOW_HEADERS,
        ),
    ] {
        if let Some(value) = req.headers().get(&asked) {
            headers.insert(answer, value.clone());
        }
    }
    headers.insert(
        header::VARY,
        HeaderValue::from_static(
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        ),
    );
    response
}
