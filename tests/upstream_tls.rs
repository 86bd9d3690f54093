//! The gateway's default upstream is HTTPS: a TLS upstream made here (rcgen certificate,
//! rustls, HTTP/2 and HTTP/1.1 by ALPN), trusted through `SSL_CERT_FILE`, which the gateway's
//! root store reads as the system's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use common::{bearer, Binary};
use http_body_util::{BodyExt, Full};

/// An HTTPS upstream answering every request with what it saw: HTTP version, method, path and
/// body length.
async fn tls_upstream(cert_pem: &str, key_pem: &str) -> std::net::SocketAddr {
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
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let version = format!("{:?}", req.version());
                        let method = req.method().to_string();
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let answer = serde_json::json!({
                            "version": version, "method": method, "path": path,
                            "body_len": body.len(),
                        });
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(answer.to_string())))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    addr
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
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (made.cert.pem(), made.signing_key.serialize_pem());
    let upstream = tls_upstream(&cert, &key).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let gateway = Binary::spawn(
        &manifest(upstream.port()),
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    );

    let seen: serde_json::Value = common::get_with_key(gateway.url("/v1/models"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["path"], "/v1/models");

    // A body goes up over HTTP/2 too.
    let body = serde_json::json!({"input": "x".repeat(100_000)}).to_string();
    let seen: serde_json::Value = common::client()
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
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let upstream = tls_upstream(&made.cert.pem(), &made.signing_key.serialize_pem()).await;
    let gateway = Binary::spawn(&manifest(upstream.port()), &[]);
    let response = common::get_with_key(gateway.url("/v1/models")).await;
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
