//! `upstream.base_url` taken apart once, so that each request's URL is put together from
//! shared pieces instead of formatted and parsed again.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};

/// Where requests go: the base URL's scheme, authority and path.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    scheme: Scheme,
    /// Host and, when not the scheme's default, port; the base URL's user info is not sent.
    authority: Authority,
    /// The base URL's path without its trailing slash: usually empty.
    path: String,
    /// `Host` for an upstream spoken to in HTTP/1 only (plain `http://`, or `https://` with
    /// `upstream.http2 = false`). Left to the client for `https://` where HTTP/2 may be
    /// negotiated, which carries the authority otherwise.
    host: Option<HeaderValue>,
}

impl Target {
    /// The target of `url`; `http2`: HTTP/2 may be negotiated with an `https://` upstream.
    pub(crate) fn new(url: &url::Url, http2: bool) -> Result<Target, String> {
        let invalid = |err: &dyn std::fmt::Display| format!("upstream.base_url: not usable: {err}");
        let host = url.host_str().unwrap_or_default();
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let authority = Authority::try_from(authority).map_err(|err| invalid(&err))?;
        let secure = url.scheme() == "https";
        Ok(Target {
            scheme: if secure { Scheme::HTTPS } else { Scheme::HTTP },
            host: if secure && http2 {
                None
            } else {
                Some(HeaderValue::from_str(authority.as_str()).map_err(|err| invalid(&err))?)
            },
            authority,
            path: url.path().trim_end_matches('/').to_owned(),
        })
    }

    /// Plain `http://`: no TLS.
    pub(crate) fn is_plain(&self) -> bool {
        self.scheme == Scheme::HTTP
    }

    /// The `Host` header a request carries to an upstream spoken to in HTTP/1 only.
    pub(crate) fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// The upstream's path and query for a request: the base path followed by the client's
    /// own path and query, byte for byte.
    pub(crate) fn join(&self, path_and_query: &PathAndQuery) -> Result<PathAndQuery, http::Error> {
        if self.path.is_empty() {
            return Ok(path_and_query.clone());
        }
        Ok(PathAndQuery::try_from(format!(
            "{}{}",
            self.path, path_and_query
        ))?)
    }

    /// The full URL of a path and query [`Target::join`] made.
    pub(crate) fn uri(&self, joined: PathAndQuery) -> Result<Uri, http::Error> {
        self.with_scheme(self.scheme.clone(), joined)
    }

    /// The same as a WebSocket URL: `ws://` or `wss://`.
    pub(crate) fn websocket_uri(&self, joined: PathAndQuery) -> Result<Uri, http::Error> {
        let scheme = if self.is_plain() { "ws" } else { "wss" };
        self.with_scheme(Scheme::try_from(scheme)?, joined)
    }

    /// The base URL itself.
    pub(crate) fn base(&self) -> Result<Uri, http::Error> {
        let root = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        self.uri(PathAndQuery::try_from(root)?)
    }

    fn with_scheme(&self, scheme: Scheme, joined: PathAndQuery) -> Result<Uri, http::Error> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(scheme);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(joined);
        Ok(Uri::from_parts(parts)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_path_goes_before_the_clients_path_and_query() {
        let target =
            Target::new(&"http://u:p@127.0.0.1:8000/openai/".parse().unwrap(), true).unwrap();
        let joined = target.join(&"/v1/x?a=%2F".parse().unwrap()).unwrap();
        assert_eq!(joined, "/openai/v1/x?a=%2F");
        assert_eq!(
            target.uri(joined.clone()).unwrap(),
            "http://127.0.0.1:8000/openai/v1/x?a=%2F"
        );
        assert_eq!(
            target.websocket_uri(joined).unwrap(),
            "ws://127.0.0.1:8000/openai/v1/x?a=%2F"
        );
        assert_eq!(target.host().unwrap(), "127.0.0.1:8000");
        let openai = Target::new(&"https://api.openai.com".parse().unwrap(), true).unwrap();
        assert!(openai.host().is_none());
        assert_eq!(openai.base().unwrap(), "https://api.openai.com/");
        // HTTP/1.1 only: the request carries the authority in Host.
        let http1 = Target::new(&"https://api.openai.com".parse().unwrap(), false).unwrap();
        assert_eq!(http1.host().unwrap(), "api.openai.com");
    }
}
