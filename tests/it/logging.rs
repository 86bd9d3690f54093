//! Request log lines leave through a writer thread: none is lost when the gateway stops
//! under load, a stalled log sink costs lines (counted), never requests, and the level filter
//! decides for request lines as for any other.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support;
use crate::support::{
    bearer, binary_path, client, get_with_key, scrape_settled, test_manifest, Binary, KillOnDrop,
    Upstream, LOG_DEADLINE, LOG_HOLD_ENV,
};
use serde_json::Value;

/// The request lines of `logs` (JSON format) whose answer completed.
fn completed_lines(logs: &str) -> usize {
    logs.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "oa_bypass::request" && line["outcome"] == "complete")
        .count()
}

/// How a test's gateway stdout is read.
enum Reader {
    /// Into the lines, by a thread that stops reading while the flag is set (a slow log
    /// sink, on demand), and sets the last flag once stdout has ended.
    Pausable(Arc<Mutex<Vec<String>>>, Arc<AtomicBool>, Arc<AtomicBool>),
    /// Never: once the pipe's 64 KiB are full, its writer blocks.
    Never,
}

/// The gateway binary with JSON request lines and `log.buffer = buffer`, in front of
/// `upstream`, its stdout read as `reader` says; once it answers, with its base URL.
async fn spawn(
    upstream: &Upstream,
    buffer: &str,
    reader: Reader,
) -> (KillOnDrop, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("routes.toml");
    let log = format!("[log]\nformat = \"json\"\nbuffer = \"{buffer}\"\n");
    std::fs::write(&manifest, test_manifest(&upstream.base_url(), &log)).unwrap();
    let port = support::closed_port().port();
    let mut child = KillOnDrop(
        Command::new(binary_path())
            .arg("--config")
            .arg(&manifest)
            .env("OA_BYPASS_SERVER__HOST", "127.0.0.1")
            .env("OA_BYPASS_SERVER__PORT", port.to_string())
            .env_remove("OA_BYPASS_CONFIG")
            // These tests count what `log.buffer` holds; CI's hold would hold more besides.
            .env_remove(LOG_HOLD_ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    if let Reader::Pausable(lines, paused, ended) = reader {
        let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
        std::thread::spawn(move || loop {
            while paused.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut line = String::new();
            match stdout.read_line(&mut line) {
                Ok(0) | Err(_) => break ended.store(true, Ordering::Release),
                Ok(_) => lines.lock().unwrap().push(line),
            }
        });
    }
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if client().get(format!("{base}/health")).send().await.is_ok() {
            return (child, base, dir);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_loses_no_log_line() {
    let upstream = Upstream::echo().await;
    let (lines, paused, ended) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let reader = Reader::Pausable(Arc::clone(&lines), Arc::clone(&paused), Arc::clone(&ended));
    let (mut gateway, base, _dir) = spawn(&upstream, "256MiB", reader).await;

    let answered = Arc::new(AtomicU64::new(0));
    let attempted = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..8 {
        let url = format!("{base}/v1/models");
        let (answered, attempted) = (Arc::clone(&answered), Arc::clone(&attempted));
        load.push(tokio::spawn(async move {
            // Until the gateway stops taking requests (bounded: 60 s at most).
            let until = tokio::time::Instant::now() + Duration::from_secs(60);
            let http = client();
            while tokio::time::Instant::now() < until {
                attempted.fetch_add(1, Ordering::Relaxed);
                let sent = http.get(&url).header("authorization", bearer()).send();
                let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(10), sent).await
                else {
                    break;
                };
                if response.status() == 200 && response.bytes().await.is_ok() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    while answered.load(Ordering::Relaxed) < 1_000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The sink slows down: lines pile up in the gateway while the load goes on, and are still
    // queued when it is told to stop.
    paused.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = gateway.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    for task in load {
        task.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    paused.store(false, Ordering::Relaxed);
    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.0.wait().unwrap();
        drop(gateway);
        status
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0));
    // Every line is in once the reader has seen the pipe's end (bounded: 10 s).
    let stdout_ends = || ended.load(Ordering::Acquire);
    support::until("the end of stdout", LOG_DEADLINE, stdout_ends).await;
    let logs = lines.lock().unwrap().concat();
    let logged = completed_lines(&logs);
    let answered = answered.load(Ordering::Relaxed) as usize;
    assert!(
        logged >= answered,
        "{answered} requests were answered, {logged} logged"
    );
    assert!(logged <= attempted.load(Ordering::Relaxed) as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_log_sink_drops_lines_and_counts_them_but_never_holds_requests() {
    let upstream = Upstream::echo().await;
    // stdout is a pipe nobody reads: once its 64 KiB are full, the writer thread blocks.
    let (child, base, _dir) = spawn(&upstream, "32KiB", Reader::Never).await;

    // 4,000 requests, 8 at a time: far more lines than the pipe and the buffer hold. Every
    // one is answered (the bound only keeps a broken build from hanging the test).
    let load = async {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let url = format!("{base}/v1/models");
            tasks.push(tokio::spawn(async move {
                let http = client();
                for _ in 0..500 {
                    let response = http
                        .get(&url)
                        .header("authorization", bearer())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), load)
        .await
        .expect("requests waited for the stalled log sink");

    let metrics = scrape_settled(format!("{base}/metrics")).await;
    let dropped: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("oa_bypass_log_lines_dropped_total "))
        .unwrap_or_else(|| panic!("no drop counter:\n{metrics}"))
        .trim()
        .parse()
        .unwrap();
    // Only the pipe (64 KiB), the buffer (32 KiB) and the batches being filled (32 KiB a
    // thread) took any of these ~300-byte lines.
    assert!(dropped >= 2_500, "{dropped} lines dropped");
    assert!(dropped <= 4_000, "{dropped} lines dropped");
    drop(child);
}

#[tokio::test]
async fn the_level_filter_decides_for_request_lines_as_for_any_other_line() {
    let upstream = Upstream::echo().await;
    let manifest = test_manifest(&upstream.base_url(), "");
    let shown = Binary::spawn(&manifest, &[("RUST_LOG", "info")]);
    let hidden = Binary::spawn(&manifest, &[("RUST_LOG", "info,oa_bypass::request=off")]);
    for gateway in [&shown, &hidden] {
        assert_eq!(get_with_key(gateway.url("/v1/models")).await.status(), 200);
    }
    shown.wait_for_log("oa_bypass::request", LOG_DEADLINE).await;
    // Past the writer's delay, the filtered one has still written no request line.
    let logs = hidden.settled_logs().await;
    assert!(logs.contains("oa-bypass listening"), "{logs}");
    assert!(!logs.contains("oa_bypass::request"), "{logs}");
}
