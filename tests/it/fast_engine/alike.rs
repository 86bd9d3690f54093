//! Both engines answer alike: heads over the limit, and refusals from every phase.

use super::*;

/// Heads over `server.max_header_bytes` are hyper's to judge, on both paths: hyper refuses
/// them with 431 or a close, though one that completes in the read that crossed the limit
/// may pass (it checks the limit only while a head is incomplete). The lane must not be the
/// looser of the two.
#[tokio::test]
async fn heads_over_the_limit_get_the_same_answer_on_both_paths() {
    let upstream = Upstream::echo().await;
    let manifest = support::test_manifest(&upstream.base_url(), "");
    let limited = format!("[server]\nmax_header_bytes = \"9KiB\"\n{manifest}");
    let lane = Gateway::start(&limited).await;
    let hyper = Gateway::start(&format!(
        "[server]\nmax_header_bytes = \"9KiB\"\nfast_lane = false\n{manifest}"
    ))
    .await;
    let status = |addr: SocketAddr, size: usize| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\n\
             Connection: close\r\nContent-Length: 2\r\nX-Big: {}\r\n\r\n{{}}",
            bearer(),
            "a".repeat(size)
        );
        let _ = stream.write_all(request.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(answer.get(..12).unwrap_or(&answer)).into_owned()
    };
    for size in [
        8_000, 9_300, 10_000, 11_500, 13_000, 15_000, 17_000, 30_000, 70_000,
    ] {
        let (ours, theirs) = (
            status(lane.addr, size).await,
            status(hyper.addr, size).await,
        );
        assert_eq!(ours, theirs, "a head of about {size} bytes");
        if size >= 30_000 {
            assert!(
                theirs.is_empty() || theirs.starts_with("HTTP/1.1 431"),
                "{theirs}"
            );
        }
    }
}

/// Every refusal the pipeline makes, phase by phase, reaches the client alike from either
/// engine, and the fast engine takes each request itself: it has no code for any of these
/// (before the pipeline, it handed 405s and 426s to hyper). A refusal added to a phase shows
/// up here for both engines, with no engine code touched.
#[tokio::test]
async fn refusals_of_every_phase_answer_alike_from_either_engine() {
    let upstream = Upstream::echo().await;
    let settings =
        "[access]\nallowed_ips = [\"203.0.113.0/24\"]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
                    [limits]\nrequests_per_minute_per_key = 1\nburst = 1\n";
    let manifest = format!(
        "{settings}{}",
        support::test_manifest(&upstream.base_url(), "")
    );
    let key = bearer();
    let request = |method: &str, path: &str, from: &str, extra: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: {from}\r\n{extra}\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let allowed = "203.0.113.7";
    let with_key = format!("Authorization: {key}\r\n");
    let limited = "Authorization: Bearer sk-limited\r\n";
    let json = "Content-Type: application/json\r\n";
    let requests = [
        // 1. Client address and access.
        request("POST", "/v1/embeddings", "198.51.100.1", &with_key, "{}"),
        // 2. Route and method.
        request("DELETE", "/v1/embeddings", allowed, &with_key, ""),
        request("GET", "/v1/realtime", allowed, &with_key, ""),
        // 3. Credential and limits.
        request("POST", "/v1/embeddings", allowed, "", "{}"),
        request("GET", "/v1/models", allowed, limited, ""),
        request("GET", "/v1/models", allowed, limited, ""),
        // 4. Body policy (each with a key of its own: phase 3 comes first, and the test key
        // has had its one request a minute).
        request(
            "POST",
            "/v1/tiny",
            allowed,
            &format!("Authorization: Bearer sk-a\r\n{json}"),
            "01234567890123",
        ),
        request(
            "POST",
            "/v1/embeddings",
            allowed,
            "Authorization: Bearer sk-b\r\nContent-Type: text/plain\r\n",
            "x",
        ),
    ];
    let mut seen = Vec::new();
    for lane in [true, false] {
        let gateway = Gateway::start(&if lane {
            manifest.clone()
        } else {
            without_lane(&manifest)
        })
        .await;
        // Only an allowed address may read the metrics.
        let scrape = || async {
            let text = support::client()
                .get(gateway.url("/metrics"))
                .header("x-forwarded-for", "203.0.113.7")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let value = |name: &str| -> u64 {
                text.lines()
                    .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
                    .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            };
            (value(LANE_REQUESTS), value(HANDOVERS))
        };
        let before = scrape().await;
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        let mut pending = Vec::new();
        let mut answers = Vec::new();
        for request in &requests {
            stream.write_all(request.as_bytes()).await.unwrap();
            answers.push(read_answer(&mut stream, &mut pending).await);
        }
        let after = scrape().await;
        // With the fast engine on, each scrape is a handover, counted in its own answer.
        let scrapes = u64::from(lane);
        let (taken, handed_over) = (after.0 - before.0, after.1 - before.1 - scrapes);
        seen.push((answers, taken, handed_over));
    }
    let (lane, hyper) = (&seen[0], &seen[1]);
    let statuses: Vec<u16> = lane.0.iter().map(|answer| answer.status).collect();
    assert_eq!(statuses, [403, 405, 426, 401, 200, 429, 413, 415]);
    assert_eq!(lane.0, hyper.0, "the engines answered differently");
    assert_eq!(
        (lane.1, lane.2),
        (requests.len() as u64, 0),
        "the fast engine handed some over"
    );
    assert_eq!(hyper.1, 0);
    // Only the one request every phase admitted reached the upstream, once per engine.
    assert_eq!(upstream.requests().len(), 2);
}
