//! The gateway's default upstream is HTTPS: a TLS upstream made here (rcgen certificate,
//! rustls, HTTP/2 and HTTP/1.1 by ALPN), trusted through `SSL_CERT_FILE`, which the gateway's
//! root store reads as the system's.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support;
use crate::support::{bearer, Binary};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// An HTTPS upstream answering every request with what it saw: HTTP version, method, path,
/// `Host` and body length, and how many connections it has accepted so far. With
/// `closing`, it answers one bodiless request per connection, then closes it (see
/// [`one_answer_then_close`]) and counts it there.
async fn tls_upstream(cert_pem: &str, key_pem: &str) -> std::net::SocketAddr {
    tls_upstream_with(cert_pem, key_pem, None).await
}

/// A self-signed certificate for `localhost` and its key, in PEM.
fn certificate() -> (String, String) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    (made.cert.pem(), made.signing_key.serialize_pem())
}

/// TLS with the certificate and key given, offering `alpn`.
fn tls_acceptor(cert_pem: &str, key_pem: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    let certs =
        vec![rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn tls_upstream_with(
    cert_pem: &str,
    key_pem: &str,
    closing: Option<Arc<AtomicUsize>>,
) -> std::net::SocketAddr {
    let acceptor = tls_acceptor(cert_pem, key_pem, &[b"h2", b"http/1.1"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let closing = closing.clone();
            let connections = accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let version = format!("{:?}", req.version());
                        let method = req.method().to_string();
                        let path = req.uri().path().to_owned();
                        let host = req
                            .headers()
                            .get("host")
                            .map(|h| h.to_str().unwrap().to_owned());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let answer = serde_json::json!({
                            "version": version, "method": method, "path": path,
                            "host": host, "body_len": body.len(), "connections": connections,
                        });
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(answer.to_string())))
                                .unwrap(),
                        )
                    },
                );
                if let Some(closed) = closing {
                    one_answer_then_close(stream, connections).await;
                    closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(io, service)
                .await;
            });
        }
    });
    addr
}

/// Reads one request head, answers it as if the connection would stay open (no
/// `Connection: close`), then closes it: TLS `close_notify`, then TCP. What an upstream does
/// when it drops idle connections.
async fn one_answer_then_close(
    mut stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    connections: usize,
) {
    use tokio::io::AsyncWriteExt;
    if support::read_head(&mut stream, &mut Vec::new())
        .await
        .is_none()
    {
        return;
    }
    let body = serde_json::json!({"version": "HTTP/1.1", "connections": connections}).to_string();
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn manifest(port: u16) -> String {
    format!(
        "[upstream]\nbase_url = \"https://localhost:{port}\"\nconnect_timeout = \"3s\"\n\n\
         [[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n\n\
         [[routes]]\nmethod = \"POST\"\npath = \"/v1/embeddings\"\nbody = \"json\"\n"
    )
}

#[tokio::test]
async fn an_https_upstream_is_reached_over_http2_when_it_offers_it() {
    let (cert, key) = certificate();
    let upstream = tls_upstream(&cert, &key).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let gateway = Binary::spawn(
        &manifest(upstream.port()),
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    );

    let seen: serde_json::Value = support::get_with_key(gateway.url("/v1/models"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["path"], "/v1/models");

    // A body goes up over HTTP/2 too.
    let body = serde_json::json!({"input": "x".repeat(100_000)}).to_string();
    let seen: serde_json::Value = support::client()
        .post(gateway.url("/v1/embeddings"))
        .header("authorization", bearer())
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["body_len"], body.len());
}

#[tokio::test]
async fn an_untrusted_upstream_certificate_is_a_clear_502() {
    let (cert, key) = certificate();
    let upstream = tls_upstream(&cert, &key).await;
    let gateway = Binary::spawn(&manifest(upstream.port()), &[]);
    let response = support::get_with_key(gateway.url("/v1/models")).await;
    assert_eq!(response.status(), 502);
    let error: serde_json::Value = response.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("The upstream could not be reached"),
        "{message}"
    );
    assert!(message.to_lowercase().contains("certificate"), "{message}");
    assert_eq!(error["error"]["code"], "upstream_unreachable");
}

/// A gateway with one worker in front of `upstream`, trusting `cert`, with `envs` besides.
fn gateway_trusting(cert: &str, upstream: std::net::SocketAddr, envs: &[(&str, &str)]) -> Binary {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert).unwrap();
    let mut all = vec![
        ("SSL_CERT_FILE", ca.to_str().unwrap()),
        ("OA_BYPASS_SERVER__WORKERS", "1"),
    ];
    all.extend_from_slice(envs);
    // The certificate is read at start-up: the directory may go once the gateway runs.
    Binary::spawn(&manifest(upstream.port()), &all)
}

/// A trusted TLS upstream (see [`tls_upstream_with`]) and a gateway with one worker speaking
/// HTTP/1.1 to it (`upstream.http2 = false`), with `envs` besides; and the upstream's port.
async fn http1_gateway(closing: Option<Arc<AtomicUsize>>, envs: &[(&str, &str)]) -> (Binary, u16) {
    let (cert, key) = certificate();
    let upstream = tls_upstream_with(&cert, &key, closing).await;
    let mut all = vec![("OA_BYPASS_UPSTREAM__HTTP2", "false")];
    all.extend_from_slice(envs);
    (gateway_trusting(&cert, upstream, &all), upstream.port())
}

/// `upstream.http2 = false`: HTTP/1.1 to an HTTPS upstream that offers HTTP/2, with the
/// authority in `Host`, on one kept-alive TLS connection; a body too large for the fast engine
/// to hold streams up over HTTP/1.1 too.
#[tokio::test]
async fn with_http2_off_an_https_upstream_gets_http1_on_kept_alive_connections() {
    // The raw transport says at trace level what it sent, and on which connection.
    let trace = ("RUST_LOG", "info,oa_bypass::upstream::raw=trace");
    let (gateway, port) = http1_gateway(None, &[trace]).await;
    let post = |body: String| {
        support::client()
            .post(gateway.url("/v1/embeddings"))
            .header("authorization", bearer())
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for round in 0..5 {
        let body = serde_json::json!({"input": format!("round {round}")}).to_string();
        let seen: serde_json::Value = post(body.clone()).await.unwrap().json().await.unwrap();
        assert_eq!(seen["version"], "HTTP/1.1", "{seen}");
        assert_eq!(seen["host"], format!("localhost:{port}"), "{seen}");
        assert_eq!(seen["body_len"], body.len());
        // The first connection carries every one of them.
        assert_eq!(seen["connections"], 1, "round {round}: {seen}");
    }
    let seen: serde_json::Value = support::get_with_key(gateway.url("/v1/models"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&seen["version"], &seen["path"]),
        (&"HTTP/1.1".into(), &"/v1/models".into())
    );

    // Whole bodies went on the raw transport (one TLS connection, then pooled), not
    // hyper's client.
    gateway
        .wait_for_logs("six requests sent", |logs| {
            logs.matches("raw transport: request sent").count() >= 6
        })
        .await;
    let logs = gateway.settled_logs().await;
    assert_eq!(
        logs.matches("raw transport: request sent").count(),
        6,
        "{logs}"
    );
    assert_eq!(logs.matches("pooled=true").count(), 5, "{logs}");

    let big = serde_json::json!({"input": "x".repeat(100_000)}).to_string();
    let seen: serde_json::Value = post(big.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(seen["version"], "HTTP/1.1", "{seen}");
    assert_eq!(seen["body_len"], big.len());
}

/// A kept-alive TLS connection the upstream has since closed (close_notify) is not used
/// again: every request is answered, each on a new connection.
#[tokio::test]
async fn with_http2_off_a_connection_the_upstream_closed_is_replaced() {
    let closed = Arc::new(AtomicUsize::new(0));
    let (gateway, _) = http1_gateway(Some(Arc::clone(&closed)), &[]).await;
    for round in 1..=4 {
        let response = support::get_with_key(gateway.url("/v1/models")).await;
        assert_eq!(response.status(), 200, "round {round}");
        let seen: serde_json::Value = response.json().await.unwrap();
        assert_eq!(seen["version"], "HTTP/1.1");
        assert_eq!(seen["connections"], round, "{seen}");
        // The upstream has closed it (on loopback, the close is then at the gateway's
        // socket), as it would have between a user's requests.
        let closes = || closed.load(Ordering::SeqCst) >= round;
        support::until("the upstream's close", support::LOG_DEADLINE, closes).await;
    }
}

/// `upstream.max_idle_connections = 0` keeps no connection for the next request: each one
/// opens its own (where the default reuses one, above).
#[tokio::test]
async fn with_no_idle_connections_kept_each_request_connects_anew() {
    let no_idle = ("OA_BYPASS_UPSTREAM__MAX_IDLE_CONNECTIONS", "0");
    let (gateway, _) = http1_gateway(None, &[no_idle]).await;
    for round in 1..=3 {
        let seen: serde_json::Value = support::get_with_key(gateway.url("/v1/models"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(seen["connections"], round, "{seen}");
    }
}

/// An HTTPS upstream speaking HTTP/2 only, letting `max_streams` requests be open on each
/// connection (SETTINGS_MAX_CONCURRENT_STREAMS), or with `max_streams` at 0, HTTP/1.1 only.
/// Each answer says in `x-connection` which connection carried it, sends one event at once,
/// and ends `hold` later: a model's answer still streaming. Also returns how many
/// connections are open.
async fn streams_upstream(
    cert_pem: &str,
    key_pem: &str,
    max_streams: u32,
    hold: std::time::Duration,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let (addr, open, _) =
        slow_streams_upstream(cert_pem, key_pem, max_streams, hold, Duration::ZERO).await;
    (addr, open)
}

/// [`streams_upstream`], starting each TLS handshake `handshake_delay` after the connection
/// is accepted: a far upstream, whose first connection takes a while. Also returns how many
/// connections it accepted in all.
async fn slow_streams_upstream(
    cert_pem: &str,
    key_pem: &str,
    max_streams: u32,
    hold: std::time::Duration,
    handshake_delay: Duration,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let alpn: &[&[u8]] = if max_streams > 0 {
        &[b"h2"]
    } else {
        &[b"http/1.1"]
    };
    let acceptor = tls_acceptor(cert_pem, key_pem, alpn);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let live = Arc::clone(&open);
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let connection = counted.fetch_add(1, Ordering::SeqCst) + 1;
            let acceptor = acceptor.clone();
            let live = Arc::clone(&live);
            live.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                tokio::time::sleep(handshake_delay).await;
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_| async move {
                    let first = futures_util::stream::once(async {
                        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from("data: {}\n\n")))
                    });
                    let end = futures_util::stream::once(async move {
                        tokio::time::sleep(hold).await;
                        Ok(hyper::body::Frame::data(Bytes::from("data: [DONE]\n\n")))
                    });
                    let body =
                        http_body_util::StreamBody::new(futures_util::StreamExt::chain(first, end));
                    Ok::<_, Infallible>(
                        http::Response::builder()
                            .header("content-type", "text/event-stream")
                            .header("x-connection", connection.to_string())
                            .body(body)
                            .unwrap(),
                    )
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if max_streams > 0 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .max_concurrent_streams(max_streams)
                    .serve_connection(io, service)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
                live.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open, accepted)
}

/// Streams beyond what one HTTP/2 connection may carry at once
/// (`upstream.http2_max_concurrent_streams`, the upstream's limit) go on another connection
/// at once, where hyper alone would hold them back until earlier answers end. A stream that
/// ended gives its place back: later requests reuse the first connection.
#[tokio::test]
async fn http2_streams_beyond_a_connections_limit_open_another_connection() {
    let (cert, key) = certificate();
    let hold = std::time::Duration::from_secs(3);
    let (upstream, _) = streams_upstream(&cert, &key, 2, hold).await;
    let two = ("OA_BYPASS_UPSTREAM__HTTP2_MAX_CONCURRENT_STREAMS", "2");
    let gateway = gateway_trusting(&cert, upstream, &[two]);
    let connection = |response: &reqwest::Response| -> u32 {
        assert_eq!(response.status(), 200);
        response.headers()["x-connection"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };

    // Five answers held open at once: two per connection.
    let mut open = Vec::new();
    for i in 0..5 {
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            support::get_with_key(gateway.url("/v1/models")),
        )
        .await
        .unwrap_or_else(|_| panic!("request {i} was held back behind the stream limit"));
        open.push(answer);
    }
    let carried: Vec<u32> = open.iter().map(connection).collect();
    assert_eq!(carried, [1, 1, 2, 2, 3]);

    // Every answer read to its end gives its place back.
    for answer in open {
        assert!(answer.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    }
    // Places are given back as the relays are dropped, which can be just after the reads.
    support::scrape_settled(gateway.url("/metrics")).await;
    let first = support::get_with_key(gateway.url("/v1/models")).await;
    let second = support::get_with_key(gateway.url("/v1/models")).await;
    assert_eq!((connection(&first), connection(&second)), (1, 1));
}

/// A burst of requests to a fresh gateway shares one HTTP/2 connection: they wait for the
/// first one's connection instead of each opening one (hyper-util cannot know yet that the
/// upstream speaks HTTP/2; a burst of 8,000 streams opened 3,800 connections).
#[tokio::test]
async fn a_burst_on_a_fresh_gateway_shares_one_http2_connection() {
    let (cert, key) = certificate();
    let hold = Duration::from_millis(300);
    // Long enough for the whole burst to reach the gateway while the first connects.
    let handshake = Duration::from_millis(500);
    let (upstream, _, accepted) = slow_streams_upstream(&cert, &key, 100, hold, handshake).await;
    let gateway = gateway_trusting(&cert, upstream, &[]);
    let burst = (0..20).map(|_| support::get_with_key(gateway.url("/v1/models")));
    let answers = futures_util::future::join_all(burst).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "connections opened");
    let carried: Vec<&str> = (answers.iter())
        .map(|answer| answer.headers()["x-connection"].to_str().unwrap())
        .collect();
    assert_eq!(carried, ["1"; 20]);
    for answer in answers {
        assert!(answer.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    }
}

/// An HTTPS upstream without HTTP/2 gets one lane: after a burst, the idle connections kept are
/// `upstream.max_idle_connections`, not that many per lane of
/// `http2_max_concurrent_streams` requests.
#[tokio::test]
async fn an_upstream_without_http2_keeps_the_idle_cap_after_a_burst() {
    let (cert, key) = certificate();
    let hold = std::time::Duration::from_millis(500);
    let (upstream, open) = streams_upstream(&cert, &key, 0, hold).await;
    let two = ("OA_BYPASS_UPSTREAM__HTTP2_MAX_CONCURRENT_STREAMS", "2");
    let one_idle = ("OA_BYPASS_UPSTREAM__MAX_IDLE_CONNECTIONS", "1");
    let gateway = gateway_trusting(&cert, upstream, &[two, one_idle]);
    let get = || async {
        let answer = support::get_with_key(gateway.url("/v1/models")).await;
        assert_eq!(answer.status(), 200);
        answer.text().await.unwrap()
    };
    // The first answer says HTTP/1.1; then five at once, each on a connection of its own.
    get().await;
    let burst = futures_util::future::join_all((0..5).map(|_| get())).await;
    assert!(burst.iter().all(|body| body.ends_with("data: [DONE]\n\n")));
    // The connections the pool does not keep are closed as their answers end.
    let mut left = usize::MAX;
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        left = open.load(Ordering::SeqCst);
        if left == 1 {
            break;
        }
    }
    assert_eq!(left, 1, "connections left open after the burst");
}
