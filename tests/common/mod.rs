//! Real parts for integration tests: a recording upstream on 127.0.0.1:0, the gateway
//! in-process on 127.0.0.1:0, and the built binary spawned as a user would run it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod python;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use poem::{Body, Endpoint, Request, Response};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

/// What the upstream received, as it arrived on the wire.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Raw path and query, exactly as in the request line.
    pub path_and_query: String,
    pub headers: http::HeaderMap,
    pub body_len: u64,
    pub body_sha256: String,
    /// The first 64 KiB of the body, for tests that look inside small bodies.
    pub body_head: Vec<u8>,
    /// The gateway's side of the connection, to tell reused connections from new ones.
    pub peer: String,
}

impl Recorded {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body_head).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub type Responder = Arc<dyn Fn(&Recorded) -> Response + Send + Sync>;

/// An upstream server that hashes every request body as it streams in, records the request,
/// then answers with whatever the test's responder says.
pub struct Upstream {
    pub addr: SocketAddr,
    pub records: Arc<Mutex<Vec<Recorded>>>,
    _stop: oneshot::Sender<()>,
}

struct RecordingEndpoint {
    records: Arc<Mutex<Vec<Recorded>>>,
    responder: Responder,
}

impl Endpoint for RecordingEndpoint {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        let mut head = Vec::new();
        let mut stream = req.take_body().into_bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(poem::error::InternalServerError)?;
            len += chunk.len() as u64;
            hasher.update(&chunk);
            let room = (64usize << 10).saturating_sub(head.len());
            head.extend_from_slice(&chunk[..room.min(chunk.len())]);
        }
        let recorded = Recorded {
            method: req.method().to_string(),
            path_and_query: req
                .uri()
                .path_and_query()
                .map(|pq| pq.as_str().to_owned())
                .unwrap_or_default(),
            headers: req.headers().clone(),
            body_len: len,
            body_sha256: hex(&hasher.finalize()),
            body_head: head,
            peer: req.remote_addr().to_string(),
        };
        let response = (self.responder)(&recorded);
        self.records.lock().unwrap().push(recorded);
        Ok(response)
    }
}

impl Upstream {
    pub async fn start(responder: impl Fn(&Recorded) -> Response + Send + Sync + 'static) -> Self {
        let records = Arc::new(Mutex::new(Vec::new()));
        let endpoint = RecordingEndpoint {
            records: Arc::clone(&records),
            responder: Arc::new(responder),
        };
        // Served with hyper directly (not poem's server, which keeps a finished connection's
        // body alive and so would hide whether the gateway cancelled its request).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoint = Arc::new(endpoint);
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let (stream, remote) = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                let endpoint = Arc::clone(&endpoint);
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let endpoint = Arc::clone(&endpoint);
                        let request: Request = (
                            req,
                            poem::web::LocalAddr(addr.into()),
                            poem::web::RemoteAddr(remote.into()),
                            http::uri::Scheme::HTTP,
                        )
                            .into();
                        async move {
                            let response = endpoint.get_response(request).await;
                            Ok::<_, std::convert::Infallible>(hyper::Response::<
                                http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
                            >::from(
                                response
                            ))
                        }
                    });
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            records,
            _stop: stop,
        }
    }

    /// Answers every request with 200 and a small JSON body naming what it received.
    pub async fn echo() -> Self {
        Upstream::start(|rec| {
            json_response(
                200,
                &serde_json::json!({
                    "method": rec.method,
                    "path": rec.path_and_query,
                    "body_len": rec.body_len,
                    "body_sha256": rec.body_sha256,
                }),
            )
        })
        .await
    }

    /// An upstream whose first response is an event stream carrying whatever the test sends
    /// into the returned sender (dropping the sender ends it); later requests get `{}`.
    pub async fn streaming() -> (Self, tokio::sync::mpsc::Sender<Bytes>) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let rx = Arc::new(Mutex::new(Some(rx)));
        let upstream = Upstream::start(move |_| match rx.lock().unwrap().take() {
            Some(rx) => Response::builder()
                .header("content-type", "text/event-stream")
                .header("x-request-id", "req_sse")
                .body(streaming_body(rx)),
            None => json_response(200, &serde_json::json!({})),
        })
        .await;
        (upstream, tx)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.records.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the upstream received no request")
    }
}

pub fn json_response(status: u16, value: &serde_json::Value) -> Response {
    Response::builder()
        .status(http::StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .body(serde_json::to_vec(value).unwrap())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A manifest with a handful of routes of every body kind, pointed at `upstream`.
pub fn test_manifest(upstream: &str, extra_settings: &str) -> String {
    format!(
        r#"
[upstream]
base_url = "{upstream}"
connect_timeout = "2s"
read_timeout = "2s"
{extra_settings}

[[routes]]
method = "GET"
path = "/v1/models"

[[routes]]
method = "POST"
path = "/v1/chat/completions"
body = "json"
streaming = true

[[routes]]
method = "POST"
path = "/v1/embeddings"
body = "json"

[[routes]]
method = "POST"
path = "/v1/files"
body = "multipart"

[[routes]]
method = "GET"
path = "/v1/files/{{file_id}}/content"

[[routes]]
method = "DELETE"
path = "/v1/files/{{file_id}}"

[[routes]]
method = "GET"
path = "/v1/files/{{file_id}}"

[[routes]]
method = "PUT"
path = "/v1/blobs/{{blob_id}}"
body = "binary"

[[routes]]
method = "POST"
path = "/v1/realtime/calls"
body = ["multipart", "sdp"]

[[routes]]
method = "POST"
path = "/v1/slow"
body = "json"
read_timeout = "300ms"

[[routes]]
method = "POST"
path = "/v1/tiny"
body = "json"
max_body = "10"

[[routes]]
method = "GET"
path = "/v1/realtime"
body = "websocket"
"#
    )
}

/// The gateway, in-process, on 127.0.0.1:0.
pub struct Gateway {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Gateway {
    pub async fn start(manifest: &str) -> Gateway {
        let config = oa_bypass::Config::from_manifest_str(manifest).unwrap();
        let app = oa_bypass::app(&config).unwrap();
        let acceptor = oa_bypass::server::Listener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = acceptor.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(oa_bypass::server::serve(
            acceptor,
            std::sync::Arc::clone(&app.serving),
            async {
                let _ = stopped.await;
            },
            config.server.clone(),
        ));
        Gateway {
            addr,
            stop: Some(stop),
            handle,
        }
    }

    /// A gateway in front of `upstream` with the test manifest.
    pub async fn in_front_of(upstream: &Upstream) -> Gateway {
        Gateway::start(&test_manifest(&upstream.base_url(), "")).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A plain HTTP client that ignores any proxy settings of the machine.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `GET url` with the test key, sent by [`client`].
pub async fn get_with_key(url: impl reqwest::IntoUrl) -> reqwest::Response {
    client()
        .get(url)
        .header("authorization", bearer())
        .send()
        .await
        .unwrap()
}

/// Checks a refusal by a `[limits]` rate or cap: 429 with `Retry-After` (1–60 s), the
/// error's `code` and type, and a message naming `setting`. Returns the `Retry-After` seconds.
pub async fn assert_429(response: reqwest::Response, code: &str, setting: &str) -> u64 {
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code);
    assert_eq!(body["error"]["type"], "requests");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(setting),
        "{body}"
    );
    retry_after
}

/// The shipped manifest (every route, the built-in settings) pointed at `upstream`.
pub fn shipped_manifest(upstream: &Upstream) -> String {
    oa_bypass::config::BUILT_IN_MANIFEST.replace(
        "base_url = \"https://api.openai.com\"",
        &format!("base_url = \"{}\"", upstream.base_url()),
    )
}

/// `gateway`'s `/openapi.json`, checked to be a 200 in JSON.
pub async fn openapi_document(gateway: &Gateway) -> serde_json::Value {
    let response = client()
        .get(gateway.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

/// The exposition at `url` (a gateway's `/metrics`), checked to be a 200 in OpenMetrics text.
pub async fn scrape(url: impl reqwest::IntoUrl) -> String {
    let response = client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    response.text().await.unwrap()
}

/// Scrapes `url` (a gateway's `/metrics`) until `holds` is true of what it shows, and returns
/// that; after [`LOG_DEADLINE`], fails the test with `what` and the last scrape. An answer's
/// counters are written when its body is finished, which can be just after the client read it.
pub async fn scrape_until(
    url: impl reqwest::IntoUrl + Clone,
    what: &str,
    holds: impl Fn(&str) -> bool,
) -> String {
    let until = tokio::time::Instant::now() + LOG_DEADLINE;
    loop {
        let metrics = scrape(url.clone()).await;
        if holds(&metrics) {
            return metrics;
        }
        if tokio::time::Instant::now() >= until {
            panic!("{what} never showed in the metrics:\n{metrics}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Scrapes `url` once no request is in flight and no stream open: every answer's end-of-body
/// counters (durations, bytes, tokens) are written before its gauges are let go.
pub async fn scrape_settled(url: impl reqwest::IntoUrl + Clone) -> String {
    scrape_until(url, "no request in flight", |metrics| {
        metrics.contains("\noa_bypass_requests_in_flight 0\n")
            && metrics.contains("\noa_bypass_open_streams 0\n")
    })
    .await
}

pub const KEY: &str = "sk-test-0123456789abcdefSECRET";

pub fn bearer() -> String {
    format!("Bearer {KEY}")
}

/// How long a test waits for a line to be logged: far past the log writer's delay, even with
/// CI's guard holding each batch back ([`LOG_HOLD_ENV`]).
pub const LOG_DEADLINE: Duration = Duration::from_secs(10);

/// Debug builds of the gateway hold each log batch back this many milliseconds when set;
/// `.ci/run` sets it for a second run of the tests that read logs, so one that reads too
/// early fails every time.
pub const LOG_HOLD_ENV: &str = "OA_BYPASS_DEBUG_LOG_HOLD_MS";

/// The longest a logged line can take to reach the captured output: the writer collects
/// partly filled batches every 100 ms, holds each back by [`LOG_HOLD_ENV`] if set, and the
/// next collection can wait out a hold too; with a margin for a loaded machine.
pub fn log_settle_time() -> Duration {
    let hold = std::env::var(LOG_HOLD_ENV)
        .ok()
        .and_then(|value| value.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    2 * hold + Duration::from_millis(600)
}

/// `.ci/run` names a file here: each test that reads a gateway's log adds its name, and CI runs
/// those tests again with [`LOG_HOLD_ENV`] set.
const LOG_READERS_ENV: &str = "OA_TEST_LOG_READERS";

/// Adds the running test's name (its thread's) to the file [`LOG_READERS_ENV`] names.
fn note_log_reader() {
    let Ok(path) = std::env::var(LOG_READERS_ENV) else {
        return;
    };
    let name = std::thread::current().name().map(str::to_owned);
    // Only libtest's threads are named after their test.
    let Some(name) = name.filter(|name| name != "main" && !name.starts_with("tokio-")) else {
        return;
    };
    // One short line per append: concurrent tests' lines do not interleave.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut file, format!("{name}\n").as_bytes()).unwrap();
}

/// The built gateway binary, spawned with a manifest file; its logs are kept for the test.
pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

pub fn binary_path() -> &'static str {
    env!("CARGO_BIN_EXE_oa-bypass")
}

impl Binary {
    /// Starts the binary on 127.0.0.1:0 and waits for its "listening" line.
    pub fn spawn(manifest: &str, envs: &[(&str, &str)]) -> Binary {
        Binary::spawn_with_files(manifest, &[], envs)
    }

    /// [`Binary::spawn`], with `files` (name, text) written beside the manifest first.
    pub fn spawn_with_files(
        manifest: &str,
        files: &[(&str, &str)],
        envs: &[(&str, &str)],
    ) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, manifest).unwrap();
        let mut command = Command::new(binary_path());
        command
            .arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .env("OA_BYPASS_SERVER__HOST", "127.0.0.1")
            .env("OA_BYPASS_SERVER__PORT", "0")
            .env_remove("OA_BYPASS_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("oa-bypass listening") {
                    if let Some(tx) = addr_tx.take() {
                        // A text line says addr=…; a JSON line has an "addr" field.
                        let addr = match serde_json::from_str::<serde_json::Value>(&line) {
                            Ok(json) => json["addr"].as_str().map(str::to_owned),
                            Err(_) => line
                                .split_whitespace()
                                .find_map(|field| field.strip_prefix("addr="))
                                .map(str::to_owned),
                        };
                        let _ = tx.send(addr);
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("the gateway did not start: {:?}", logs.lock().unwrap()))
            .parse()
            .unwrap();
        Binary {
            child,
            addr,
            logs,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The manifest file the binary was started with (rewrite it, then SIGHUP).
    pub fn manifest_path(&self) -> std::path::PathBuf {
        self._dir.path().join("routes.toml")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process has written so far. Lines leave its log writer in batches, so a
    /// test asserting what is there waits for it: [`Binary::wait_for_log`],
    /// [`Binary::wait_for_logs`], or [`Binary::settled_logs`] for what must be absent. Read
    /// it directly only once the process has exited.
    pub fn logs(&self) -> String {
        note_log_reader();
        self.read_logs()
    }

    fn read_logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits up to `deadline` for a log line containing `pattern` and returns that line;
    /// past the deadline, fails the test with the whole log.
    pub async fn wait_for_log(&self, pattern: &str, deadline: Duration) -> String {
        note_log_reader();
        let until = tokio::time::Instant::now() + deadline;
        // Each line is looked at once: a gateway under load logs many.
        let mut checked = 0;
        loop {
            {
                let lines = self.logs.lock().unwrap();
                if let Some(line) = lines[checked..].iter().find(|line| line.contains(pattern)) {
                    return line.clone();
                }
                checked = lines.len();
            }
            if tokio::time::Instant::now() >= until {
                panic!(
                    "no line with {pattern:?} in the log within {deadline:?}:\n{}",
                    self.read_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to [`LOG_DEADLINE`] until the whole log satisfies `holds`, and returns it;
    /// past the deadline, fails the test with `what` and the whole log.
    pub async fn wait_for_logs(&self, what: &str, holds: impl Fn(&str) -> bool) -> String {
        self.wait_for_logs_within(what, LOG_DEADLINE, holds).await
    }

    async fn wait_for_logs_within(
        &self,
        what: &str,
        deadline: Duration,
        holds: impl Fn(&str) -> bool,
    ) -> String {
        note_log_reader();
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let logs = self.read_logs();
            if holds(&logs) {
                return logs;
            }
            if tokio::time::Instant::now() >= until {
                panic!("no {what} in the log within {deadline:?}:\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The log once every line logged before this call has been written: for asserting that
    /// something is absent. Waits past the writer's longest delay, [`log_settle_time`].
    pub async fn settled_logs(&self) -> String {
        tokio::time::sleep(log_settle_time()).await;
        self.logs()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process that is killed when the test ends, even by a panic.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `VmRSS` or `VmHWM` of a process, in KiB, from /proc.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Runs the binary with arguments and returns (exit code, stdout, stderr).
pub fn run_binary(args: &[&str], envs: &[(&str, &str)], dir: &Path) -> (i32, String, String) {
    let mut command = Command::new(binary_path());
    command
        .args(args)
        .current_dir(dir)
        .env_remove("OA_BYPASS_CONFIG");
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A body stream of `total` bytes in `chunk`-sized pieces of a repeating pattern, generated
/// on the fly so the test itself holds no large buffer.
pub fn pattern_stream(
    total: u64,
    chunk: usize,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let block: Bytes = (0..chunk)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let mut sent = 0u64;
    futures_util::stream::poll_fn(move |_| {
        if sent >= total {
            return std::task::Poll::Ready(None);
        }
        let n = (total - sent).min(chunk as u64) as usize;
        sent += n as u64;
        std::task::Poll::Ready(Some(Ok(block.slice(..n))))
    })
}

/// The sha256 of what [`pattern_stream`] produces.
pub fn pattern_sha256(total: u64, chunk: usize) -> String {
    let block: Vec<u8> = (0..chunk).map(|i| (i % 251) as u8).collect();
    let mut hasher = Sha256::new();
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk as u64) as usize;
        hasher.update(&block[..n]);
        left -= n as u64;
    }
    hex(&hasher.finalize())
}

pub fn streaming_body(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Body {
    Body::from_bytes_stream(tokio_stream_from(rx).map(Ok::<_, std::io::Error>))
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Bytes> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Starts a streaming Chat Completions request through `gateway`, with a key.
pub async fn start_chat_stream(gateway: &Gateway) -> reqwest::Response {
    client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", bearer())
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","stream":true,"messages":[]}"#)
        .send()
        .await
        .unwrap()
}

/// Sends `request` as raw bytes (no client normalisation of the path) and returns the whole
/// answer as text. The request should say `Connection: close`.
pub async fn raw_exchange(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// A raw `GET path` with the test key, answered in full.
pub async fn raw_get(addr: SocketAddr, path: &str) -> String {
    raw_exchange(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            bearer()
        ),
    )
    .await
}
