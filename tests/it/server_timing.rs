//! `tracing.server_timing`: a forwarded answer says how long the gateway and the upstream
//! took (`Server-Timing`), from either engine; without the setting it says nothing.

use std::time::Duration;

use crate::support;
use crate::support::{bearer, client, json_response, Gateway, Upstream};

/// The upstream waits this long before answering, so its share has a known floor.
const UPSTREAM_WAIT: Duration = Duration::from_millis(50);

async fn timing_of(gateway: &Gateway) -> Vec<String> {
    let response = client()
        .post(gateway.url("/v1/embeddings"))
        .header("authorization", bearer())
        .header("content-type", "application/json")
        .body(r#"{"model":"text-embedding-3-small","input":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
        .headers()
        .get_all("server-timing")
        .iter()
        .map(|value| value.to_str().unwrap().to_owned())
        .collect()
}

/// `name;dur=…` metrics of one `Server-Timing` value, by name.
fn metrics(value: &str) -> Vec<(String, f64)> {
    value
        .split(',')
        .map(|metric| {
            let (name, dur) = metric.trim().split_once(";dur=").unwrap();
            (name.to_owned(), dur.parse().unwrap())
        })
        .collect()
}

// Several threads: the upstream's wait blocks one of them, not the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_say_what_the_gateway_and_the_upstream_took() {
    let upstream = Upstream::start(|_| {
        std::thread::sleep(UPSTREAM_WAIT);
        json_response(200, &serde_json::json!({"object": "list", "data": []}))
    })
    .await;
    let manifest = support::test_manifest(&upstream.base_url(), "[tracing]\nserver_timing = true");
    for manifest in [
        manifest.clone(),
        format!("[server]\nfast_lane = false\n{manifest}"),
    ] {
        let gateway = Gateway::start(&manifest).await;
        let timing = timing_of(&gateway).await;
        assert_eq!(timing.len(), 1, "{timing:?}");
        let metrics = metrics(&timing[0]);
        let names: Vec<&str> = metrics.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["gateway", "upstream"], "{timing:?}");
        assert!(metrics[0].1 >= 0.0, "{timing:?}");
        assert!(
            metrics[1].1 >= UPSTREAM_WAIT.as_secs_f64() * 1000.0,
            "the upstream's share includes its wait: {timing:?}"
        );
    }
    let plain = Gateway::in_front_of(&upstream).await;
    assert_eq!(
        timing_of(&plain).await,
        Vec::<String>::new(),
        "off by default"
    );
}
