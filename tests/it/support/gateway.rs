//! The gateway as tests run it: in-process on 127.0.0.1:0, or the built binary as a child
//! process, whose output is captured and waited on.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::{eventually, test_manifest, Upstream, LOG_DEADLINE};

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
            app.serving(),
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
        // Each line is looked at once: a gateway under load logs many.
        let mut checked = 0;
        let what = format!("a line with {pattern:?} in the log");
        eventually(&what, deadline, || {
            let lines = self.logs.lock().unwrap();
            let found = lines[checked..].iter().find(|line| line.contains(pattern));
            let seen = found.cloned().ok_or(WholeLog(self));
            checked = lines.len();
            std::future::ready(seen)
        })
        .await
    }

    /// Waits up to [`LOG_DEADLINE`] until the whole log satisfies `holds`, and returns it;
    /// past the deadline, fails the test with `what` and the whole log.
    pub async fn wait_for_logs(&self, what: &str, holds: impl Fn(&str) -> bool) -> String {
        note_log_reader();
        let what = format!("{what} in the log");
        eventually(&what, LOG_DEADLINE, || {
            let logs = self.read_logs();
            std::future::ready(if holds(&logs) { Ok(logs) } else { Err(logs) })
        })
        .await
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

/// A process's whole log, read when it is shown: a failing wait's "what was seen".
struct WholeLog<'a>(&'a Binary);

impl std::fmt::Display for WholeLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.read_logs())
    }
}
