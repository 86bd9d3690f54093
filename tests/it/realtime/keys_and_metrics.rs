//! Realtime sessions under key rules (allowed hashes, held keys), and open sessions in metrics.

use super::*;

#[tokio::test]
async fn allowed_key_hashes_apply_to_websocket_keys_too() {
    let upstream = WsUpstream::start(choose_realtime, echo).await;
    let allowed = oa_bypass::config::hash_line(KEY);
    let gateway = Gateway::start(&format!(
        "[access]\nallowed_key_hashes = [\"{allowed}\"]\n{}",
        manifest(&upstream.base_url(), "")
    ))
    .await;
    let browser = |key: &str| {
        vec![(
            "sec-websocket-protocol",
            format!("realtime, openai-insecure-api-key.{key}"),
        )]
    };
    let (mut ws, _) = connect(gateway.addr, &browser(KEY)).await.unwrap();
    ws.send(Message::text("ok")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("ok"));
    let err = connect(gateway.addr, &browser("sk-not-listed"))
        .await
        .unwrap_err();
    let WsError::Http(response) = err else {
        panic!("expected an HTTP refusal, got {err:?}")
    };
    assert_eq!(response.status(), 401);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_held_key_replaces_the_browsers_key_subprotocol_upstream() {
    const HELD: &str = "sk-held-realtime-UPSTREAMSECRET";
    std::env::set_var("OA_TEST_REALTIME_HELD", HELD);
    let upstream = WsUpstream::start(choose_realtime, echo).await;
    let allowed = oa_bypass::config::hash_line(KEY);
    let gateway = Gateway::start(&format!(
        "[access]\nallowed_key_hashes = [\"{allowed}\"]\n{}",
        manifest(
            &upstream.base_url(),
            "keys_env = [\"OA_TEST_REALTIME_HELD\"]"
        )
    ))
    .await;
    let (mut ws, response) = connect(
        gateway.addr,
        &[(
            "sec-websocket-protocol",
            format!("realtime, openai-insecure-api-key.{KEY}, openai-beta.realtime-v1"),
        )],
    )
    .await
    .unwrap();
    // The client offered `realtime` and gets it; the upstream never saw the client's key.
    assert_eq!(response.headers()["sec-websocket-protocol"], "realtime");
    let seen = upstream.last_handshake();
    assert_eq!(seen["authorization"], format!("Bearer {HELD}").as_str());
    assert_eq!(
        seen["sec-websocket-protocol"],
        "realtime, openai-beta.realtime-v1"
    );
    ws.send(Message::text("ok")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("ok"));
}

/// The `oa_bypass_realtime_sessions` gauge and the route's byte counters, read from /metrics.
fn realtime_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

#[tokio::test]
async fn open_sessions_show_in_metrics() {
    let upstream = WsUpstream::start(accept_all, echo).await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let scrape = || support::scrape(gateway.url("/metrics"));
    let (mut ws, _) = connect(gateway.addr, &[("authorization", bearer())])
        .await
        .unwrap();
    ws.send(Message::text("{\"type\":\"session.update\"}"))
        .await
        .unwrap();
    next_message(&mut ws).await;
    assert_eq!(
        realtime_metric(&scrape().await, "oa_bypass_realtime_sessions"),
        1.0
    );
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let text = support::scrape_until(gateway.url("/metrics"), "the session's end", |text| {
        realtime_metric(text, "oa_bypass_realtime_sessions") == 0.0
    })
    .await;
    let sent = realtime_metric(
        &text,
        "oa_bypass_sent_bytes_total{route=\"/v1/realtime\",method=\"GET\"}",
    );
    assert!(sent >= 25.0, "{text}");
    assert!(text.contains(
        "oa_bypass_requests_total{route=\"/v1/realtime\",method=\"GET\",status=\"101\"} 1"
    ));
}
