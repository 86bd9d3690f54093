//! WebSocket passthrough for routes with body kind `websocket` (the Realtime API).
//!
//! The upstream is connected first, with the client's credentials, `OpenAI-*` headers and
//! `Sec-WebSocket-Protocol` list, so a refusal (401, 403, 404, 429) reaches the client as that
//! HTTP answer. Only then is the client's upgrade accepted, with the subprotocol the upstream
//! chose, and frames are relayed both ways unchanged (see `relay`). Browsers authenticate with
//! a subprotocol (`openai-insecure-api-key.<key>`): it is forwarded, counted as a credential,
//! and never logged.
//!
//! The pipeline decides whether a session may open and prepares its headers; this module
//! speaks the WebSocket handshake and relays frames, over a connection the upstream layer
//! makes (the same connector, proxy and TLS as HTTP requests).

mod relay;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RealtimeConfig;
use crate::headers;
use crate::message::Io;
use crate::observe::log::{self, SessionLine};
use crate::observe::metrics::RouteMetrics;
use crate::observe::usage::{self, Usage};
use crate::upstream::{BoxError, Upstream};

/// Handshake headers that belong to one hop of a WebSocket connection (RFC 6455 §4).
const HANDSHAKE_HEADERS: [HeaderName; 4] = [
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_EXTENSIONS,
    header::SEC_WEBSOCKET_ACCEPT,
];

/// The client's side of a WebSocket once the engine has switched protocols: resolves to
/// the raw connection. Made by the engine that owns the client's connection.
pub(crate) type ClientUpgrade = Pin<Box<dyn Future<Output = io::Result<Box<dyn Io>>> + Send>>;

/// Open realtime sessions, so shutdown can wait for them and then close them with 1001.
#[derive(Clone, Default)]
pub(crate) struct Sessions {
    tracker: TaskTracker,
    closing: CancellationToken,
}

impl Sessions {
    pub(crate) fn open(&self) -> usize {
        self.tracker.len()
    }

    /// Resolves when every session has ended (call after [`Sessions::stop_accepting`]).
    pub(crate) async fn finished(&self) {
        self.tracker.wait().await;
    }

    pub(crate) fn stop_accepting(&self) {
        self.tracker.close();
    }

    /// Tells every session to close both sides with 1001 (going away).
    pub(crate) fn close_all(&self) {
        self.closing.cancel();
    }
}

/// What a session's log line and metrics need, and what it holds while it lives.
pub(crate) struct Session<G> {
    pub route: Arc<str>,
    pub metrics: Arc<RouteMetrics>,
    /// The first 8 hex digits of the key's SHA-256.
    pub key_hash: String,
    pub start: Instant,
    /// Held for the session's life (its place under the concurrency limits).
    pub held: G,
    /// Told each `response.done` event's usage, when the caller's key counts it.
    pub on_usage: Option<OnUsage>,
}

/// What a session tells of the usage its responses report.
pub(crate) type OnUsage = Box<dyn Fn(&Usage) + Send + Sync>;

/// How a handshake ended when it did not fail.
pub(crate) enum Opened {
    /// The upstream accepted: switch the client's protocols with these headers; the session
    /// runs once the client's upgrade completes.
    Switching(HeaderMap),
    /// The upstream said no over HTTP: the client hears exactly that.
    Refused(http::Response<Bytes>),
}

/// Why no session opened.
pub(crate) enum Failed {
    /// No handshake within `upstream.connect_timeout`.
    TimedOut(Duration),
    /// The upstream could not be reached, or did not speak WebSocket.
    Unreachable(BoxError),
}

/// Connects realtime clients to the upstream and relays their sessions.
pub(crate) struct Realtime {
    idle_timeout: Duration,
    ws_config: WebSocketConfig,
    sessions: Sessions,
}

impl Realtime {
    pub(crate) fn new(config: &RealtimeConfig, sessions: Sessions) -> Realtime {
        let max = usize::try_from(config.max_message).unwrap_or(usize::MAX);
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
            // Backpressure: a slow reader holds at most about one message per direction.
            .max_write_buffer_size(max.saturating_add(1 << 20));
        Realtime {
            idle_timeout: config.idle_timeout,
            ws_config,
            sessions,
        }
    }

    /// Opens the upstream side of a session to `joined` with `headers` (the client's, as the
    /// pipeline prepared them for the upstream), then, once the client's `upgrade` completes,
    /// relays frames until either side ends. `client_key` is the client's
    /// `Sec-WebSocket-Key` ([`client_key`]).
    pub(crate) async fn open<G: Send + 'static>(
        &self,
        upstream: &Upstream,
        joined: PathAndQuery,
        headers: HeaderMap,
        client_key: &str,
        upgrade: ClientUpgrade,
        session: Session<G>,
    ) -> Result<Opened, Failed> {
        let timeout = upstream.connect_timeout();
        let connecting = tokio::time::timeout(timeout, self.connect(upstream, joined, headers));
        let (upstream, answer) = match connecting.await {
            Err(_) => return Err(Failed::TimedOut(timeout)),
            Ok(Err(Handshake::Refused(response))) => {
                return Ok(Opened::Refused(refusal(*response)))
            }
            Ok(Err(Handshake::Failed(err))) => return Err(Failed::Unreachable(err)),
            Ok(Ok(connected)) => connected,
        };

        let mut switching = HeaderMap::new();
        switching.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        switching.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(client_key.as_bytes())) {
            switching.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        for (name, value) in answer.headers() {
            let skip = HANDSHAKE_HEADERS.contains(name)
                || name == header::CONNECTION
                || name == header::UPGRADE
                || name == header::CONTENT_LENGTH
                || name == header::TRANSFER_ENCODING;
            if !skip {
                switching.append(name.clone(), value.clone());
            }
        }

        let idle_timeout = self.idle_timeout;
        let ws_config = self.ws_config;
        let closing = self.sessions.closing.clone();
        self.sessions.tracker.spawn(async move {
            let Session {
                route,
                metrics,
                key_hash,
                start,
                held,
                on_usage,
            } = session;
            let _held = held;
            let _open = metrics.gateway().realtime_session();
            let client = match upgrade.await {
                Ok(client) => client,
                Err(err) => {
                    tracing::info!(target: "oa_bypass::request", route = %route, error = %err,
                        outcome = "client_upgrade_failed", "realtime session not started");
                    return;
                }
            };
            let client =
                WebSocketStream::from_raw_socket(client, Role::Server, Some(ws_config)).await;
            let watch = |message: &Message| {
                let (Some(on_usage), Message::Text(text)) = (&on_usage, message) else {
                    return;
                };
                if let Some(usage) = usage::realtime_usage(text) {
                    on_usage(&usage);
                }
            };
            let summary = relay::run(client, upstream, idle_timeout, closing, &watch).await;
            let elapsed = start.elapsed();
            metrics.finish(
                elapsed,
                summary.bytes_from_client,
                summary.bytes_from_upstream,
            );
            log::session(&SessionLine {
                route: &route,
                elapsed,
                messages_in: summary.from_client,
                messages_out: summary.from_upstream,
                bytes_in: summary.bytes_from_client,
                bytes_out: summary.bytes_from_upstream,
                outcome: summary.ending.as_str(),
                key_hash: &key_hash,
            });
        });
        Ok(Opened::Switching(switching))
    }

    async fn connect(
        &self,
        upstream: &Upstream,
        joined: PathAndQuery,
        headers: HeaderMap,
    ) -> Result<
        (
            WebSocketStream<relay::UpstreamIo>,
            http::Response<Option<Vec<u8>>>,
        ),
        Handshake,
    > {
        let (io, uri) = upstream
            .websocket(joined)
            .await
            .map_err(Handshake::Failed)?;
        let request =
            handshake_request(&uri, headers).map_err(|err| Handshake::Failed(Box::new(err)))?;
        match tokio_tungstenite::client_async_with_config(request, io, Some(self.ws_config)).await {
            Ok(connected) => Ok(connected),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(Handshake::Refused(response))
            }
            Err(err) => Err(Handshake::Failed(Box::new(err))),
        }
    }
}

enum Handshake {
    Refused(Box<http::Response<Option<Vec<u8>>>>),
    Failed(BoxError),
}

/// The upstream's handshake request: the client's end-to-end headers (credentials,
/// `OpenAI-*`, the subprotocol list) with this hop's handshake headers made afresh.
fn handshake_request(
    uri: &http::Uri,
    mut headers: HeaderMap,
) -> Result<http::Request<()>, http::Error> {
    for name in &HANDSHAKE_HEADERS {
        headers.remove(name);
    }
    headers.remove(header::CONTENT_LENGTH);
    let authority = uri.authority().map_or("", |authority| authority.as_str());
    let mut request = http::Request::builder()
        .method("GET")
        .uri(uri)
        .header(header::HOST, authority)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, generate_key())
        .body(())?;
    // The pipeline marked the key-carrying values sensitive.
    request.headers_mut().extend(headers);
    Ok(request)
}

/// Checks the client asked for a WebSocket (RFC 6455 §4.2.1) and returns its key; `Err`
/// says what is missing.
pub(crate) fn client_key(headers: &HeaderMap) -> Result<String, &'static str> {
    let has_token = |name: HeaderName, token: &str| {
        headers::list_items(headers, &name).any(|item| item.eq_ignore_ascii_case(token))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(
            "this route is a WebSocket; connect with a WebSocket client (Upgrade: websocket)",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err("only WebSocket version 13 is supported (Sec-WebSocket-Version: 13)");
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .ok_or("the WebSocket handshake has no Sec-WebSocket-Key")
}

/// The upstream's refusal as read: status, headers and body. Its `Content-Length` goes:
/// the body is sent as it was read.
fn refusal(refusal: http::Response<Option<Vec<u8>>>) -> http::Response<Bytes> {
    let (mut parts, body) = refusal.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    http::Response::from_parts(parts, Bytes::from(body.unwrap_or_default()))
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
        assert_eq!(client_key(&good).unwrap(), "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(client_key(&map(&[("connection", "upgrade")])).is_err());
    }

    #[test]
    fn upstream_request_keeps_end_to_end_headers_and_renews_handshake_ones() {
        let mut client = map(&[
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
        // What the pipeline does with every request's headers before they go upstream.
        headers::prepare_upstream_request(&mut client, None);
        let uri: http::Uri = "wss://api.openai.com/v1/realtime?model=m".parse().unwrap();
        let request = handshake_request(&uri, client).unwrap();
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
