//! WebSocket passthrough for routes with body kind `websocket` (the Realtime API).
//!
//! The upstream is connected first, with the client's credentials, `OpenAI-*` headers and
//! `Sec-WebSocket-Protocol` list, so a refusal (401, 403, 404, 429) reaches the client as that
//! HTTP answer. Only then is the client's upgrade accepted, with the subprotocol the upstream
//! chose, and frames are relayed both ways unchanged (see `relay`). Browsers authenticate with
//! a subprotocol (`openai-insecure-api-key.<key>`): it is forwarded, counted as a credential,
//! and never logged.

mod relay;
pub mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use poem::{Body, Request, Response};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;

use crate::config::{Config, ConfigError};
use crate::error::GatewayError;
use crate::headers;
use tunnel::Route as TunnelRoute;

/// Handshake headers that belong to one hop of a WebSocket connection (RFC 6455 §4).
const HANDSHAKE_HEADERS: [HeaderName; 4] = [
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_EXTENSIONS,
    header::SEC_WEBSOCKET_ACCEPT,
];

/// Open realtime sessions, so shutdown can wait for them and then close them with 1001.
#[derive(Clone, Default)]
pub struct Sessions {
    tracker: TaskTracker,
    closing: CancellationToken,
}

impl Sessions {
    pub fn open(&self) -> usize {
        self.tracker.len()
    }

    /// Resolves when every session has ended (call after [`Sessions::stop_accepting`]).
    pub async fn finished(&self) {
        self.tracker.wait().await;
    }

    pub fn stop_accepting(&self) {
        self.tracker.close();
    }

    /// Tells every session to close both sides with 1001 (going away).
    pub fn close_all(&self) {
        self.closing.cancel();
    }
}

/// Connects realtime clients to the upstream and relays their sessions.
pub struct Relay {
    /// `upstream.base_url` with a ws:// or wss:// scheme, without a trailing slash.
    base: Url,
    proxy: Option<Url>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    ws_config: WebSocketConfig,
    tls: tokio_rustls::TlsConnector,
    sessions: Sessions,
}

impl Relay {
    pub fn new(
        config: &Config,
        sessions: Sessions,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Relay, ConfigError> {
        let mut base = config.upstream.base_url.clone();
        let scheme = if base.scheme() == "https" {
            "wss"
        } else {
            "ws"
        };
        base.set_scheme(scheme).map_err(|()| {
            ConfigError::Invalid(vec![format!(
                "upstream.base_url: cannot derive a {scheme}:// URL from it"
            )])
        })?;
        let max = usize::try_from(config.realtime.max_message).unwrap_or(usize::MAX);
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
            // Backpressure: a slow reader holds at most about one message per direction.
            .max_write_buffer_size(max.saturating_add(1 << 20));
        Ok(Relay {
            base,
            proxy: config.upstream.proxy.clone(),
            connect_timeout: config.upstream.connect_timeout,
            idle_timeout: config.realtime.idle_timeout,
            ws_config,
            tls: tokio_rustls::TlsConnector::from(tls),
            sessions,
        })
    }

    /// Answers one upgrade request for a `websocket` route.
    pub async fn handle(
        &self,
        admitted: crate::proxy::Admitted<'_>,
        req: Request,
    ) -> Result<Response, GatewayError> {
        let start = admitted.start;
        let client_key = check_upgrade_request(req.headers())?;
        let on_upgrade = req
            .take_upgrade()
            .map_err(|err| GatewayError::Internal(format!("connection cannot upgrade: {err}")))?;

        let upstream_url = self.upstream_url(&req)?;
        let (upstream, upstream_response) = match tokio::time::timeout(
            self.connect_timeout,
            self.connect_upstream(&upstream_url, req.headers()),
        )
        .await
        {
            Err(_) => {
                return Err(GatewayError::UpstreamConnectTimeout {
                    timeout: self.connect_timeout,
                })
            }
            Ok(Err(UpstreamHandshake::Refused(response))) => {
                // The upstream said no over HTTP: the client hears exactly that.
                return Ok(relay_refusal(*response));
            }
            Ok(Err(UpstreamHandshake::Failed(err))) => {
                return Err(GatewayError::UpstreamUnreachable(err))
            }
            Ok(Ok(connected)) => connected,
        };

        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(
                header::SEC_WEBSOCKET_ACCEPT,
                derive_accept_key(client_key.as_bytes()),
            )
            .finish();
        for (name, value) in upstream_response.headers() {
            let skip = HANDSHAKE_HEADERS.contains(name)
                || name == header::CONNECTION
                || name == header::UPGRADE
                || name == header::CONTENT_LENGTH
                || name == header::TRANSFER_ENCODING;
            if !skip {
                response.headers_mut().append(name.clone(), value.clone());
            }
        }

        let route = Arc::clone(admitted.route_name);
        let metrics = Arc::clone(admitted.metrics);
        let key = admitted.key.prefix();
        let admission = admitted.admission;
        let idle_timeout = self.idle_timeout;
        let ws_config = self.ws_config;
        let closing = self.sessions.closing.clone();
        self.sessions.tracker.spawn(async move {
            // Held for the session's life: a WebSocket counts against the concurrency limits.
            let _admission = admission;
            let _open = metrics.all().realtime_session();
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(err) => {
                    tracing::info!(target: "oa_bypass::request", route = %route, error = %err,
                        outcome = "client_upgrade_failed", "realtime session not started");
                    return;
                }
            };
            let client =
                WebSocketStream::from_raw_socket(upgraded, Role::Server, Some(ws_config)).await;
            let summary = relay::run(client, upstream, idle_timeout, closing).await;
            let elapsed = start.elapsed();
            metrics.finish(
                elapsed,
                summary.bytes_from_client,
                summary.bytes_from_upstream,
            );
            crate::observe::log::session(&crate::observe::log::SessionLine {
                route: &route,
                elapsed,
                messages_in: summary.from_client,
                messages_out: summary.from_upstream,
                bytes_in: summary.bytes_from_client,
                bytes_out: summary.bytes_from_upstream,
                outcome: summary.ending.as_str(),
                key_hash: &key,
            });
        });
        Ok(response)
    }

    /// `base_url` (as ws/wss) followed by the client's raw path and query.
    fn upstream_url(&self, req: &Request) -> Result<Url, GatewayError> {
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path(), |pq| pq.as_str());
        let base = self.base.as_str().trim_end_matches('/');
        Url::parse(&format!("{base}{path_and_query}"))
            .map_err(|err| GatewayError::Internal(format!("cannot build upstream URL: {err}")))
    }

    async fn connect_upstream(
        &self,
        url: &Url,
        client_headers: &HeaderMap,
    ) -> Result<
        (
            WebSocketStream<relay::UpstreamIo>,
            http::Response<Option<Vec<u8>>>,
        ),
        UpstreamHandshake,
    > {
        let failed = |err: std::io::Error| UpstreamHandshake::Failed(Box::new(err));
        let host = url
            .host_str()
            .ok_or_else(|| failed(std::io::Error::other("the upstream URL has no host")))?
            .to_owned();
        let port = url.port_or_known_default().unwrap_or(443);
        let secure = url.scheme() == "wss";
        let route = match &self.proxy {
            Some(proxy) => TunnelRoute::Proxy(proxy.clone()),
            None => tunnel::route_from_env(secure, &host),
        };
        let tcp = tunnel::connect(&route, &host, port).await.map_err(failed)?;
        let io = if secure {
            let name =
                rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                    .map_err(|err| failed(std::io::Error::other(err)))?;
            let tls = self.tls.connect(name, tcp).await.map_err(failed)?;
            relay::UpstreamIo::Right(Box::new(tls))
        } else {
            relay::UpstreamIo::Left(tcp)
        };

        let request = upstream_request(url, &host, port, client_headers)
            .map_err(|err| failed(std::io::Error::other(err)))?;
        match tokio_tungstenite::client_async_with_config(request, io, Some(self.ws_config)).await {
            Ok((stream, response)) => Ok((stream, response)),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(UpstreamHandshake::Refused(response))
            }
            Err(err) => Err(UpstreamHandshake::Failed(Box::new(err))),
        }
    }
}

enum UpstreamHandshake {
    Refused(Box<http::Response<Option<Vec<u8>>>>),
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// The upstream's handshake request: the client's end-to-end headers (credentials,
/// `OpenAI-*`, the subprotocol list) with this hop's handshake headers made afresh.
fn upstream_request(
    url: &Url,
    host: &str,
    port: u16,
    client_headers: &HeaderMap,
) -> Result<http::Request<()>, http::Error> {
    let mut headers = client_headers.clone();
    headers::prepare_upstream_request(&mut headers);
    for name in &HANDSHAKE_HEADERS {
        headers.remove(name);
    }
    headers.remove(header::CONTENT_LENGTH);
    let default_port = if url.scheme() == "wss" { 443 } else { 80 };
    let authority = if port == default_port {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    };
    let mut request = http::Request::builder()
        .method("GET")
        .uri(url.as_str())
        .header(header::HOST, authority)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, generate_key())
        .body(())?;
    // `prepare_upstream_request` marked the key-carrying values sensitive.
    request.headers_mut().extend(headers);
    Ok(request)
}

/// Checks the client asked for a WebSocket (RFC 6455 §4.2.1) and returns its key.
fn check_upgrade_request(headers: &HeaderMap) -> Result<String, GatewayError> {
    let has_token = |name: HeaderName, token: &str| {
        headers::list_items(headers, &name).any(|item| item.eq_ignore_ascii_case(token))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(GatewayError::NotAWebSocket(
            "this route is a WebSocket; connect with a WebSocket client (Upgrade: websocket)",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(GatewayError::NotAWebSocket(
            "only WebSocket version 13 is supported (Sec-WebSocket-Version: 13)",
        ));
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .ok_or(GatewayError::NotAWebSocket(
            "the WebSocket handshake has no Sec-WebSocket-Key",
        ))
}

/// The upstream's refusal as the client's answer: status, end-to-end headers, body.
fn relay_refusal(refusal: http::Response<Option<Vec<u8>>>) -> Response {
    let (parts, body) = refusal.into_parts();
    let mut response_headers = parts.headers;
    headers::strip_hop_by_hop(&mut response_headers);
    response_headers.remove(header::CONTENT_LENGTH);
    let mut response = Response::builder()
        .status(parts.status)
        .body(Body::from(body.unwrap_or_default()));
    response.headers_mut().extend(response_headers);
    response
}

/// The TLS client settings for upstream connections: Mozilla's roots (webpki-roots) and the
/// system's, with ring.
pub fn client_tls_config() -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // The system's store too, so a private CA installed on the host is honoured, as reqwest
    // honours it for plain requests. Unreadable certificates are skipped.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| ConfigError::Invalid(vec![format!("TLS setup failed: {err}")]))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::test_map as map;

    #[test]
    fn upgrade_request_needs_upgrade_connection_version_and_key() {
        let good = map(&[
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert_eq!(
            check_upgrade_request(&good).unwrap(),
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
        assert!(check_upgrade_request(&map(&[("connection", "upgrade")])).is_err());
    }

    #[test]
    fn upstream_request_keeps_end_to_end_headers_and_renews_handshake_ones() {
        let client = map(&[
            ("host", "gateway"),
            ("authorization", "Bearer sk-1"),
            ("openai-beta", "realtime=v1"),
            (
                "sec-websocket-protocol",
                "realtime, openai-insecure-api-key.sk-1",
            ),
            ("sec-websocket-key", "client-key"),
            ("sec-websocket-extensions", "permessage-deflate"),
            ("x-forwarded-for", "203.0.113.1"),
        ]);
        let url = Url::parse("wss://api.openai.com/v1/realtime?model=m").unwrap();
        let request = upstream_request(&url, "api.openai.com", 443, &client).unwrap();
        let headers = request.headers();
        assert_eq!(headers["host"], "api.openai.com");
        assert_eq!(headers["authorization"], "Bearer sk-1");
        assert_eq!(headers["openai-beta"], "realtime=v1");
        assert!(headers["sec-websocket-protocol"].is_sensitive());
        assert_ne!(headers["sec-websocket-key"], "client-key");
        assert!(headers.get("sec-websocket-extensions").is_none());
        assert!(headers.get("x-forwarded-for").is_none());
        assert_eq!(request.uri(), "wss://api.openai.com/v1/realtime?model=m");
    }
}
