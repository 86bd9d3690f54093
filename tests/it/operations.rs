//! Running it: HTTPS from PEM files (a certificate made here with rcgen, checked by a rustls
//! client, swapped on SIGHUP), and reloading the manifest on SIGHUP under load, with a good and
//! a bad manifest, while a stream stays open.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support;
use crate::support::{bearer, Binary, Upstream, LOG_DEADLINE};
use bytes::Bytes;
use serde_json::json;

/// Waits until `done` holds; past [`LOG_DEADLINE`], fails naming `what`, with the logs.
async fn wait_until<F, Fut>(gateway: &Binary, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let check = || {
        let done = done();
        async move { done.await.then_some(()).ok_or_else(|| gateway.logs()) }
    };
    support::eventually(what, LOG_DEADLINE, check).await;
}

fn self_signed() -> (String, String) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    (made.cert.pem(), made.signing_key.serialize_pem())
}

/// A client that trusts only `cert_pem` and sends `localhost` to `addr`.
fn client_trusting(cert_pem: &str, addr: std::net::SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .resolve("localhost", addr)
        .no_proxy()
        .build()
        .unwrap()
}

fn tls_manifest(upstream: &str, dir: &std::path::Path) -> String {
    format!(
        r#"
[server.tls]
cert = "{cert}"
key = "{key}"

{routes}"#,
        cert = dir.join("cert.pem").display(),
        key = dir.join("key.pem").display(),
        routes = support::test_manifest(upstream, ""),
    )
}

#[tokio::test]
async fn serves_https_from_pem_files_and_swaps_them_on_sighup() {
    let upstream = Upstream::echo().await;
    let certs = tempfile::tempdir().unwrap();
    let (cert_a, key_a) = self_signed();
    std::fs::write(certs.path().join("cert.pem"), &cert_a).unwrap();
    std::fs::write(certs.path().join("key.pem"), &key_a).unwrap();
    let gateway = Binary::spawn(&tls_manifest(&upstream.base_url(), certs.path()), &[]);
    let url = format!("https://localhost:{}/v1/models", gateway.addr.port());

    let client = client_trusting(&cert_a, gateway.addr);
    let response = client
        .get(&url)
        .header("authorization", bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // ALPN offers h2: the client speaks HTTP/2 without being told to.
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(upstream.last().path_and_query, "/v1/models");
    // The container health check speaks HTTPS to a TLS gateway.
    let port = gateway.addr.port().to_string();
    let manifest = gateway.manifest_path();
    let (code, _, stderr) = support::run_binary(
        &["healthcheck", "--config", manifest.to_str().unwrap()],
        &[
            ("OA_BYPASS_SERVER__HOST", "127.0.0.1"),
            ("OA_BYPASS_SERVER__PORT", &port),
        ],
        certs.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    // Plain HTTP on the TLS port gets nowhere.
    let plain = support::client()
        .get(gateway.url("/health"))
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);

    // A renewed certificate: new files, SIGHUP, and new connections get it.
    let (cert_b, key_b) = self_signed();
    std::fs::write(certs.path().join("cert.pem"), &cert_b).unwrap();
    std::fs::write(certs.path().join("key.pem"), &key_b).unwrap();
    gateway.signal("HUP");
    wait_until(&gateway, "the new certificate served", || async {
        let fresh = client_trusting(&cert_b, gateway.addr);
        let sent = fresh.get(&url).header("authorization", bearer()).send();
        sent.await.is_ok()
    })
    .await;
    let stale = client_trusting(&cert_a, gateway.addr);
    assert!(
        stale.get(&url).send().await.is_err(),
        "the old certificate is still served"
    );

    // A broken key file on the next SIGHUP: refused, the current certificate stays.
    std::fs::write(certs.path().join("key.pem"), "not a key").unwrap();
    gateway.signal("HUP");
    gateway
        .wait_for_log("TLS reload refused", LOG_DEADLINE)
        .await;
    let fresh = client_trusting(&cert_b, gateway.addr);
    let response = fresh
        .get(&url)
        .header("authorization", bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        !gateway.settled_logs().await.contains(&key_b[40..80]),
        "key material in the logs"
    );
}

#[test]
fn check_refuses_tls_files_that_do_not_load() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = self_signed();
    let (_, other_key) = self_signed();
    std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), &other_key).unwrap();
    let manifest = tls_manifest("http://127.0.0.1:9", dir.path());
    std::fs::write(dir.path().join("routes.toml"), manifest).unwrap();
    let (code, _, stderr) =
        support::run_binary(&["--check", "--config", "routes.toml"], &[], dir.path());
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("does not belong to the certificate"),
        "{stderr}"
    );
    assert!(!stderr.contains(&other_key[40..80]));
}

const STREAM_ROUTES: &str = r#"
[[routes]]
method = "POST"
path = "/v1/chat/completions"
body = "json"
streaming = true
"#;

const MODELS_ROUTE: &str = r#"
[[routes]]
method = "GET"
path = "/v1/models"
"#;

fn reload_manifest(upstream: &str, routes: &str) -> String {
    format!(
        "[upstream]\nbase_url = \"{upstream}\"\nread_timeout = \"30s\"\n\n[metrics]\nenabled = true\n{routes}"
    )
}

// One scenario whose steps read in order; its setup is already in helpers.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn sighup_reloads_the_manifest_under_load_without_dropping_anything() {
    let (upstream, events) = Upstream::streaming().await;
    let base = upstream.base_url();
    let gateway = Binary::spawn(&reload_manifest(&base, STREAM_ROUTES), &[]);
    let client = support::client();

    // A stream opened on the first manifest.
    let mut stream = client
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", bearer())
        .json(&json!({"stream": true}))
        .send()
        .await
        .unwrap();
    let mut received = Vec::new();
    let next_event = async |n: u32, stream: &mut reqwest::Response, received: &mut Vec<u8>| {
        let event = format!("data: {{\"n\":{n}}}\n\n");
        events.send(Bytes::from(event.clone())).await.unwrap();
        let chunk = stream
            .chunk()
            .await
            .unwrap()
            .expect("the stream ended early");
        assert_eq!(chunk, event.as_bytes());
        received.extend_from_slice(&chunk);
    };
    next_event(1, &mut stream, &mut received).await;

    // Steady traffic on four connections throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let url = gateway.url("/v1/chat/completions");
        workers.push(tokio::spawn(async move {
            let client = support::client();
            while !stop.load(Ordering::Relaxed) {
                let result = client
                    .post(&url)
                    .header("authorization", bearer())
                    .json(&json!({"model": "m"}))
                    .send()
                    .await;
                match result {
                    Ok(response) if response.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) => failed.lock().unwrap().push(response.status().to_string()),
                    Err(err) => failed.lock().unwrap().push(err.to_string()),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A good manifest that adds a route.
    let models = client
        .get(gateway.url("/v1/models"))
        .header("authorization", bearer());
    assert_eq!(
        models.try_clone().unwrap().send().await.unwrap().status(),
        404
    );
    std::fs::write(
        gateway.manifest_path(),
        reload_manifest(&base, &format!("{STREAM_ROUTES}{MODELS_ROUTE}")),
    )
    .unwrap();
    gateway.signal("HUP");
    wait_until(&gateway, "the new route", || async {
        models.try_clone().unwrap().send().await.unwrap().status() == 200
    })
    .await;
    next_event(2, &mut stream, &mut received).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A bad manifest: refused with its error logged; the second one keeps serving.
    std::fs::write(
        gateway.manifest_path(),
        reload_manifest(
            &base,
            &format!("{STREAM_ROUTES}{}", MODELS_ROUTE.replace("GET", "FETCH")),
        ),
    )
    .unwrap();
    gateway.signal("HUP");
    // The refusal, and on the line after it the reason.
    gateway
        .wait_for_log("manifest reload refused", LOG_DEADLINE)
        .await;
    gateway
        .wait_for_log("routes[1].method: \"FETCH\" is not one of", LOG_DEADLINE)
        .await;
    assert_eq!(
        models.try_clone().unwrap().send().await.unwrap().status(),
        200
    );
    let ready: serde_json::Value = client
        .get(gateway.url("/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["config"]["generation"], 2);
    assert_eq!(ready["config"]["routes"], 2);
    next_event(3, &mut stream, &mut received).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The stream from before both reloads ends cleanly with every event, in order.
    drop(events);
    assert!(stream.chunk().await.unwrap().is_none());
    assert_eq!(
        String::from_utf8(received).unwrap(),
        "data: {\"n\":1}\n\ndata: {\"n\":2}\n\ndata: {\"n\":3}\n\n"
    );
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "requests failed across the reloads: {failed:?}"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 20,
        "too little load: {}",
        ok.load(Ordering::Relaxed)
    );

    let metrics = support::scrape(gateway.url("/metrics")).await;
    assert!(
        metrics.contains("oa_bypass_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("oa_bypass_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
}
